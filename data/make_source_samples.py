"""Write small samples of the non-OASST data formats the Falcon chat models were tuned on, for tests and demos.

Each sample has the field layout of the real release and English text built from small fact tables, so that
a tiny model trained on them visibly learns (questions recur with consistent answers):

- dolly_sample.jsonl        databricks-dolly-15k rows (instruction, context, response, category)
- alpaca_sample.json        a Stanford Alpaca JSON array (instruction, input, output), indented as released
- hh_rlhf_sample.jsonl.gz   Anthropic hh-rlhf rows (chosen, rejected), "\\n\\nHuman: ...\\n\\nAssistant: ..."
- chat_sample.jsonl         OpenAI-style {"messages": [...]} records, some with a system message or a lang
- preference_sample.jsonl   preference pairs in the common layout: {"prompt" or "messages", "chosen", "rejected"}
- text_sample.txt           encyclopedia-style paragraphs separated by blank lines
- oasst1_sample/            a `datasets` save_to_disk folder of flat oasst1 rows, built from the first trees of
                            oasst_sample.jsonl.gz
- natural_instructions_sample/
                            Natural Instructions v2 task files as allenai/natural-instructions holds them
                            (Definition, Positive/Negative Examples, Instances of {id, input, output: [...]} and
                            the metadata fields), four tasks of 6 to 16 instances
- natural_instructions_sample.jsonl
                            the same tasks as the flat rows of Muennighoff/natural-instructions (task_name, id,
                            definition, inputs, targets), one row per output of an instance

One conversation is on purpose in both the dolly and the alpaca sample, with the same prompt and response
(DUPLICATE below), so that cross-source deduplication can be tested. Every record is valid for its loader.

Run as `python data/make_source_samples.py`; the output is byte-for-byte the same on every run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import textwrap
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent
SEED = 20230601
OASST1_TREES = 40  # the first trees of oasst_sample.jsonl.gz: about 190 rows

DUPLICATE = ("What is the capital of France?", "The capital of France is Paris.")

# (country, capital, continent, language, currency)
COUNTRIES = [
    ("France", "Paris", "Europe", "French", "the euro"),
    ("Japan", "Tokyo", "Asia", "Japanese", "the yen"),
    ("Kenya", "Nairobi", "Africa", "Swahili and English", "the Kenyan shilling"),
    ("Canada", "Ottawa", "North America", "English and French", "the Canadian dollar"),
    ("Peru", "Lima", "South America", "Spanish", "the sol"),
    ("Norway", "Oslo", "Europe", "Norwegian", "the Norwegian krone"),
    ("Egypt", "Cairo", "Africa", "Arabic", "the Egyptian pound"),
    ("Australia", "Canberra", "Oceania", "English", "the Australian dollar"),
    ("India", "New Delhi", "Asia", "Hindi and English", "the rupee"),
    ("Brazil", "Brasilia", "South America", "Portuguese", "the real"),
    ("Greece", "Athens", "Europe", "Greek", "the euro"),
    ("Mexico", "Mexico City", "North America", "Spanish", "the Mexican peso"),
]

# (animal, class, what it eats, where it lives, one fact)
ANIMALS = [
    ("red fox", "mammal", "eats small animals, berries and insects", "forests, farmland and cities",
     "It hunts mice by leaping high and pouncing on them through the snow."),
    ("honey bee", "insect", "feeds on nectar and pollen", "hives in hollow trees and in boxes kept by beekeepers",
     "A worker bee tells the others where flowers are by doing a waggle dance."),
    ("emperor penguin", "bird", "eats fish, krill and squid", "the sea ice around Antarctica",
     "The male keeps the egg warm on his feet for about two months while the female feeds at sea."),
    ("African elephant", "mammal", "eats grass, leaves and bark", "the savannas and forests of Africa",
     "It is the largest land animal and can eat more than 100 kilograms of plants a day."),
    ("green sea turtle", "reptile", "eats seagrass and algae", "warm coastal waters",
     "Females return to the beach where they hatched to lay their own eggs."),
    ("barn owl", "bird", "hunts mice, voles and shrews", "open country and old buildings",
     "Its hearing is so good that it can catch a mouse in complete darkness."),
    ("octopus", "mollusc", "eats crabs, clams and small fish", "the sea floor",
     "It has three hearts and can change the colour of its skin in a fraction of a second."),
    ("giraffe", "mammal", "eats the leaves of tall trees", "the savannas of Africa",
     "Its neck has seven bones, the same number as a human neck."),
]  # fmt: skip

# (river, length in kilometres, where it flows, the sea it reaches)
RIVERS = [
    ("Nile", 6650, "north through eleven countries of eastern Africa", "the Mediterranean Sea"),
    ("Amazon", 6400, "east across South America", "the Atlantic Ocean"),
    ("Danube", 2850, "east through ten countries of central and eastern Europe", "the Black Sea"),
    ("Mississippi", 3730, "south through the United States", "the Gulf of Mexico"),
    ("Thames", 346, "east through southern England and London", "the North Sea"),
    ("Mekong", 4900, "south from the Tibetan Plateau through Southeast Asia", "the South China Sea"),
]

# (invention, year, inventor, what it did)
INVENTIONS = [
    ("printing press", 1440, "Johannes Gutenberg", "made books cheap enough for many people to own"),
    ("telephone", 1876, "Alexander Graham Bell", "let people talk to each other over long distances"),
    ("light bulb", 1879, "Thomas Edison", "brought safe electric light into homes"),
    ("airplane", 1903, "the Wright brothers", "made the first powered, controlled flight possible"),
    ("penicillin", 1928, "Alexander Fleming", "became the first widely used antibiotic"),
    ("World Wide Web", 1989, "Tim Berners-Lee", "linked documents across the internet"),
]

FRUITS = ["apple", "banana", "cherry", "mango", "pear", "plum", "peach", "grape"]
VEGETABLES = ["carrot", "potato", "onion", "spinach", "cabbage", "leek", "pea", "turnip"]
ANTONYMS = [("hot", "cold"), ("tall", "short"), ("early", "late"), ("happy", "sad"), ("open", "closed"),
            ("heavy", "light"), ("fast", "slow"), ("empty", "full")]  # fmt: skip
SEASONS = {
    "spring": "Soft rain wakes the sleeping seeds,\nGreen shoots rise through last year's weeds,\n"
    "The robins build, the rivers run,\nAnd every day brings more of sun.",
    "summer": "Long bright days and evenings warm,\nBees at work in every form,\n"
    "The fields are gold, the sea is blue,\nAnd night comes late and quiet too.",
    "autumn": "The maples blush in red and gold,\nThe mornings turn a little cold,\n"
    "The apples fall, the geese fly south,\nAnd wood smoke drifts from every house.",
    "winter": "The snow lies deep on field and lane,\nThe frost draws ferns on every pane,\n"
    "The fire is lit, the kettle sings,\nAnd we wait for the warmth that spring time brings.",
}
TIPS = {
    "sleep better": ["Go to bed and get up at the same time every day.",
                     "Keep your bedroom dark, quiet and cool.",
                     "Avoid coffee and large meals in the evening."],
    "save money on groceries": ["Plan your meals for the week and shop with a list.",
                                "Buy fruit and vegetables that are in season.",
                                "Compare the price per kilogram, not the price per pack."],
    "learn a new language": ["Practise a little every day instead of a lot once a week.",
                             "Listen to podcasts or songs in the language.",
                             "Find a partner to speak with, even for ten minutes."],
    "keep houseplants healthy": ["Water only when the top of the soil feels dry.",
                                 "Give each plant the light it likes, bright or shaded.",
                                 "Wipe the dust off the leaves now and then."],
}  # fmt: skip
RECIPES = {
    "pancakes": ("Whisk 1 cup of flour, 1 cup of milk, 1 egg, a spoon of sugar and a pinch of salt into a "
                 "smooth batter.", "Pour small rounds into a hot buttered pan and flip each one when bubbles "
                 "appear on top."),
    "tomato soup": ("Soften a chopped onion and a clove of garlic in olive oil, then add two cans of "
                    "tomatoes and a cup of stock.", "Simmer for twenty minutes, blend until smooth and season "
                    "with salt and pepper."),
    "a cup of tea": ("Boil fresh water and pour it over a tea bag or a spoon of loose tea.",
                     "Let it steep for three to five minutes, then remove the tea and add milk if you like."),
    "rice": ("Rinse 1 cup of rice and put it in a pot with 2 cups of water and a pinch of salt.",
             "Bring it to a boil, cover, and cook on low heat for about 15 minutes until the water is gone."),
}  # fmt: skip
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one or two sentences.",
    "You are a friendly tutor who explains things simply.",
]


def languages_spoken(language: str) -> str:
    if " and " in language:
        return f"main languages spoken there are {language}"
    return f"main language spoken there is {language}"


def country_paragraph(country: str, capital: str, continent: str, language: str, currency: str) -> str:
    return (
        f"{country} is a country in {continent}. Its capital is {capital}. The {languages_spoken(language)}, and "
        f"its currency is {currency}."
    )


def animal_paragraph(animal: str, klass: str, diet: str, habitat: str, fact: str) -> str:
    return f"The {animal} is a {klass} that {diet}. It lives in {habitat}. {fact}"


def river_paragraph(river: str, length: int, course: str, sea: str) -> str:
    return f"The {river} is a river about {length:,} kilometres long. It flows {course} and empties into {sea}."


def invention_paragraph(invention: str, year: int, inventor: str, effect: str) -> str:
    return f"The {invention} is credited to {inventor}, who introduced it in {year}. It {effect}."


def paragraphs() -> list[str]:
    return (
        [country_paragraph(*row) for row in COUNTRIES]
        + [animal_paragraph(*row) for row in ANIMALS]
        + [river_paragraph(*row) for row in RIVERS]
        + [invention_paragraph(*row) for row in INVENTIONS]
    )


def bullet_list(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def dolly_rows(rng: random.Random) -> list[dict]:
    rows = [{"instruction": DUPLICATE[0], "context": "", "response": DUPLICATE[1], "category": "open_qa"}]
    for country, capital, continent, language, currency in COUNTRIES[1:]:
        rows.append({"instruction": f"What is the capital of {country}?", "context": "",
                     "response": f"The capital of {country} is {capital}.", "category": "open_qa"})
        rows.append({"instruction": f"What currency is used in {country}?",
                     "context": country_paragraph(country, capital, continent, language, currency),
                     "response": f"{country} uses {currency}.", "category": "closed_qa"})
    for river, length, course, sea in RIVERS:
        rows.append({"instruction": f"Based on this passage, how long is the {river}?",
                     "context": river_paragraph(river, length, course, sea),
                     "response": f"The {river} is about {length:,} kilometres long.", "category": "closed_qa"})
    for invention, year, inventor, effect in INVENTIONS:
        rows.append({"instruction": "Extract the year and the inventor from the text.",
                     "context": invention_paragraph(invention, year, inventor, effect),
                     "response": f"Year: {year}\nInventor: {inventor}", "category": "information_extraction"})
    for animal, *rest in ANIMALS:
        rows.append({"instruction": "Summarize this paragraph in one sentence.",
                     "context": animal_paragraph(animal, *rest),
                     "response": f"The {animal} is a {rest[0]} that lives in {rest[2]}.",
                     "category": "summarization"})
    for _ in range(5):
        items = rng.sample(FRUITS, 3) + rng.sample(VEGETABLES, 3)
        rng.shuffle(items)
        answer = "\n".join(f"{item}: {'fruit' if item in FRUITS else 'vegetable'}" for item in items)
        rows.append({"instruction": "Classify each of these as a fruit or a vegetable: " + ", ".join(items),
                     "context": "", "response": answer, "category": "classification"})
    for goal, tips in TIPS.items():
        rows.append({"instruction": f"Give me three ways to {goal}.", "context": "",
                     "response": bullet_list(tips), "category": "brainstorming"})
    for season, poem in SEASONS.items():
        rows.append({"instruction": f"Write a short poem about {season}.", "context": "", "response": poem,
                     "category": "creative_writing"})
    return rows


def alpaca_rows(rng: random.Random) -> list[dict]:
    rows = [{"instruction": DUPLICATE[0], "input": "", "output": DUPLICATE[1]}]
    for country, capital, *_ in COUNTRIES[1:]:
        rows.append({"instruction": "Name the capital city of the given country.", "input": country,
                     "output": f"{capital} is the capital of {country}."})
    for word, opposite in ANTONYMS:
        rows.append({"instruction": "Give the opposite of the given word.", "input": word, "output": opposite})
    for _ in range(8):
        numbers = rng.sample(range(1, 100), 5)
        rows.append({"instruction": "Sort these numbers from smallest to largest.",
                     "input": ", ".join(map(str, numbers)), "output": ", ".join(map(str, sorted(numbers)))})
    for celsius in (0, 10, 20, 25, 30, 37, 100):
        fahrenheit = celsius * 9 / 5 + 32
        rows.append({"instruction": f"Convert {celsius} degrees Celsius to Fahrenheit.", "input": "",
                     "output": f"{celsius} degrees Celsius is {fahrenheit:g} degrees Fahrenheit."})
    for dish, (first, second) in RECIPES.items():
        rows.append({"instruction": f"Explain how to make {dish} in two steps.", "input": "",
                     "output": f"1. {first}\n2. {second}"})
    for invention, year, inventor, _ in INVENTIONS:
        rows.append({"instruction": f"Who invented the {invention}, and when?", "input": "",
                     "output": f"The {invention} was introduced by {inventor} in {year}."})
    return rows


def hh_dialogue(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def hh_rows() -> list[dict]:
    rows = []

    def add(prefix: list[tuple[str, str]], chosen: str, rejected: str) -> None:
        rows.append({"chosen": hh_dialogue([*prefix, ("Assistant", chosen)]),
                     "rejected": hh_dialogue([*prefix, ("Assistant", rejected)])})

    for goal, tips in TIPS.items():
        # A reply with blank lines inside it: only "\n\nHuman:" / "\n\nAssistant:" start a new turn.
        add([("Human", f"How can I {goal}?")],
            "Here are a few things that help:\n\n" + bullet_list(tips) + "\n\nWould you like more detail on any "
            "of them?",
            "Just try harder.")
    for dish, (first, second) in RECIPES.items():
        add([("Human", f"How do I make {dish}?"), ("Assistant", first), ("Human", "What do I do after that?")],
            second, "I don't know.")
    for country, capital, _, language, _ in COUNTRIES:
        add([("Human", f"I'm planning a trip to {country}. What's the capital?"),
             ("Assistant", f"The capital of {country} is {capital}."),
             ("Human", "What language do people speak there?")],
            f"The {languages_spoken(language)}. Learning a few polite phrases before you go is always "
            "appreciated.",
            "Why would you want to go there?")
    for animal, *_, fact in ANIMALS:
        add([("Human", f"Tell me something interesting about the {animal}.")],
            fact, f"The {animal} is an animal.")
    # "Human:" quoted inside a turn, not after a blank line: it stays text.
    add([("Human", 'My script prints "Human: hello" on every line. How do I remove the prefix?')],
        'If every line starts with the same prefix, you can cut it off: in Python, '
        'line.removeprefix("Human: ") returns the rest of the line.',
        "Delete the script.")
    for invention, year, inventor, effect in INVENTIONS:
        add([("Human", f"Who invented the {invention}?"), ("Assistant", f"It is credited to {inventor}."),
             ("Human", "When was that, and why did it matter?")],
            f"That was in {year}. It {effect}.", "A long time ago.")
    return rows


def preference_rows() -> list[dict]:
    """A helpful reply preferred to an unhelpful one: single prompts, and conversations with a system message."""
    rows = []
    for country, capital, continent, _, currency in COUNTRIES:
        rows.append({"prompt": f"What is the capital of {country}?",
                     "chosen": f"The capital of {country} is {capital}.", "rejected": "Look it up yourself."})
        rows.append({"messages": [{"role": "system", "content": SYSTEMS[len(rows) % len(SYSTEMS)]},
                                  {"role": "user", "content": f"Where is {country}?"},
                                  {"role": "assistant", "content": f"{country} is in {continent}."},
                                  {"role": "user", "content": "Which currency do they use?"}],
                     "chosen": f"People in {country} pay with the {currency}.", "rejected": "Money."})
    for animal, _, diet, habitat, _ in ANIMALS:
        rows.append({"prompt": f"What does the {animal} eat?", "chosen": f"The {animal} is a {diet}.",
                     "rejected": f"I have never seen a {animal}."})
        rows.append({"prompt": f"Where does the {animal} live?", "chosen": f"The {animal} lives in {habitat}.",
                     "rejected": "Somewhere."})
    return rows


def chat_rows(rng: random.Random) -> list[dict]:
    def record(turns: list[tuple[str, str]], system: str | None = None, lang: str | None = None) -> dict:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": content} for role, content in turns
        ]
        return {"messages": messages, **({"lang": lang} if lang else {})}

    rows = []
    for i, (country, _, continent, _, currency) in enumerate(COUNTRIES):
        system = SYSTEMS[i % len(SYSTEMS)] if i % 2 == 0 else None
        rows.append(record([("user", f"Which continent is {country} in?"),
                            ("assistant", f"{country} is in {continent}."),
                            ("user", "And what currency do they use?"),
                            ("assistant", f"{country} uses {currency}.")], system, "en" if i % 3 == 0 else None))
    for i, (river, *_, sea) in enumerate(RIVERS):
        rows.append(record([("user", f"Where does the {river} end?"),
                            ("assistant", f"The {river} empties into {sea}.")], SYSTEMS[1] if i % 2 else None))
    for word, opposite in ANTONYMS:
        rows.append(record([("user", f"What is the opposite of '{word}'?"),
                            ("assistant", f"The opposite of '{word}' is '{opposite}'.")], lang="en"))
    for i, (a, b) in enumerate((rng.randint(2, 40), rng.randint(2, 40)) for _ in range(10)):
        turns = [("user", f"What is {a} plus {b}?"), ("assistant", f"{a} plus {b} is {a + b}.")]
        if i % 4 == 3:
            # A trailing user turn, as in logged chats that stopped before the reply: the loader drops it.
            turns.append(("user", "Thanks! Can you check another one?"))
        rows.append(record(turns, SYSTEMS[2] if i % 3 == 0 else None))
    for dish, (first, second) in RECIPES.items():
        rows.append(record([("user", f"How do I make {dish}?"), ("assistant", f"1. {first}\n2. {second}")],
                           SYSTEMS[0]))
    return rows


# Natural Instructions tasks: (name, definition, categories, domains, positive and negative examples, instances
# as (input, outputs)). Antonyms with a second accepted answer give instances with two outputs.
MORE_OPPOSITES = {"hot": ["cool"], "happy": ["unhappy"], "open": ["shut"]}


def natural_instructions_tasks() -> list[tuple[str, dict]]:
    """(task name, task file content) of each sample task."""
    foods = [food for pair in zip(FRUITS, VEGETABLES) for food in pair]
    specs = [
        ("task001_country_capital_answer_generation",
         "In this task, you are given the name of a country. Your job is to answer with the name of the country's "
         "capital city. Answer with the name of the city only.",
         ["Question Answering"], ["Geography"],
         [("Country: Germany", "Berlin", "Berlin is the capital of Germany."),
          ("Country: Chile", "Santiago", "Santiago is the capital of Chile.")],
         ("Country: Italy", "Italy is a country in Europe.", "The answer must be the capital city alone: Rome."),
         [(f"Country: {country}", [capital]) for country, capital, *_ in COUNTRIES]),
        ("task002_adjective_antonym_generation",
         "Given an adjective, generate its antonym. An antonym of a word is a word opposite in meaning to it.",
         ["Word Semantics"], ["Dictionaries"],
         [("wet", "dry", "Dry is the opposite of wet."), ("loud", "quiet", "Quiet is the opposite of loud.")],
         ("big", "large", "Large means the same as big; it is a synonym, not an antonym."),
         [(word, [opposite, *MORE_OPPOSITES.get(word, [])]) for word, opposite in ANTONYMS]),
        ("task003_river_length_extraction",
         "In this task, you are given a passage about a river and a question about it. Answer the question with a "
         "span from the passage.",
         ["Information Extraction"], ["Wikipedia", "Geography"],
         [("Passage: The Rhine is a river about 1,230 kilometres long. It flows north through six countries and "
           "empties into the North Sea.\nQuestion: How long is the Rhine?", "about 1,230 kilometres",
           "The passage gives the length of the Rhine.")],
         ("Passage: The Seine is a river about 777 kilometres long. It flows west through northern France and "
          "empties into the English Channel.\nQuestion: How long is the Seine?", "the English Channel",
          "The answer must be the length, not where the river ends."),
         [(f"Passage: {river_paragraph(*row)}\nQuestion: How long is the {row[0]}?", [f"about {row[1]:,} kilometres"])
          for row in RIVERS]),
        ("task004_fruit_or_vegetable_classification",
         'You are given the name of a food. Classify it as "fruit" or "vegetable". Your answer must be one of '
         "these two words.",
         ["Text Categorization"], ["Food"],
         [("lemon", "fruit", "A lemon is a fruit."), ("celery", "vegetable", "Celery is a vegetable.")],
         ("tomato", "red", "The answer must be fruit or vegetable."),
         [(food, ["fruit" if food in FRUITS else "vegetable"]) for food in foods]),
    ]  # fmt: skip
    return [(spec[0], natural_instructions_task(*spec)) for spec in specs]


def natural_instructions_task(
    name: str,
    definition: str,
    categories: list[str],
    domains: list[str],
    positive: list[tuple[str, str, str]],
    negative: tuple[str, str, str],
    instances: list[tuple[str, list[str]]],
) -> dict:
    """A task file's content, in the field order of the real ones; instance ids as theirs, "task<n>-<32 hex>"."""
    number = name[len("task"):name.index("_")]
    return {
        "Contributors": ["model_training sample"],
        "Source": ["model_training fact tables"],
        "URL": ["https://github.com/allenai/natural-instructions"],
        "Categories": categories,
        "Reasoning": ["Commonsense Reasoning"],
        "Definition": [definition],
        "Positive Examples": [{"input": i, "output": o, "explanation": e} for i, o, e in positive],
        "Negative Examples": [{"input": negative[0], "output": negative[1], "explanation": negative[2]}],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": domains,
        "Instances": [
            {"id": f"task{number}-{hashlib.md5(f'{name}:{index}'.encode()).hexdigest()}", "input": text,
             "output": outputs}
            for index, (text, outputs) in enumerate(instances)
        ],
        "Instance License": ["CC BY 4.0"],
    }  # fmt: skip


def natural_instructions_rows(tasks: list[tuple[str, dict]]) -> list[dict]:
    """The flat rows of Muennighoff/natural-instructions: one per output of each instance."""
    return [
        {"task_name": name, "id": instance["id"], "definition": task["Definition"][0], "inputs": instance["input"],
         "targets": output}
        for name, task in tasks
        for instance in task["Instances"]
        for output in instance["output"]
    ]  # fmt: skip


def write_natural_instructions(folder: Path, rows_path: Path) -> None:
    tasks = natural_instructions_tasks()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, task in tasks:
        # The real task files are indented by 4, non-ASCII text kept as it is.
        write_text(folder / f"{name}.json", json.dumps(task, indent=4, ensure_ascii=False) + "\n")
    write_text(rows_path, jsonl(natural_instructions_rows(tasks)))


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def write_gzip(path: Path, text: str) -> None:
    # mtime=0 and an empty stored name make the gzip bytes identical on every run.
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.encode("utf-8"))


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# The columns of the released oasst1 dataset, in its order and with its types.
_STR, _INT, _FLOAT, _BOOL = (datasets.Value(kind) for kind in ("string", "int32", "float64", "bool"))
OASST1_FEATURES = datasets.Features({
    "message_id": _STR, "parent_id": _STR, "user_id": _STR, "created_date": _STR, "text": _STR, "role": _STR,
    "lang": _STR, "review_count": _INT, "review_result": _BOOL, "deleted": _BOOL, "rank": _FLOAT,
    "synthetic": _BOOL, "model_name": _STR,
    "detoxify": {name: _FLOAT for name in (
        "toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit")},
    "message_tree_id": _STR, "tree_state": _STR,
    "emojis": {"name": datasets.List(_STR), "count": datasets.List(_INT)},
    "labels": {"name": datasets.List(_STR), "value": datasets.List(_FLOAT), "count": datasets.List(_INT)},
})  # fmt: skip


def oasst1_rows(trees: list[dict]) -> list[dict]:
    """The flat rows of message trees: a parent before its children, emojis and labels as parallel lists."""
    rows = []

    def visit(message: dict, tree: dict) -> None:
        emojis, labels = message.get("emojis"), message.get("labels")
        row = {name: message.get(name) for name in OASST1_FEATURES}
        row.update(
            message_tree_id=tree["message_tree_id"],
            tree_state=tree["tree_state"],
            detoxify=None,
            emojis={"name": list(emojis), "count": list(emojis.values())} if emojis else None,
            labels={"name": list(labels), "value": [label["value"] for label in labels.values()],
                    "count": [label["count"] for label in labels.values()]} if labels else None,
        )  # fmt: skip
        rows.append(row)
        for reply in message.get("replies") or []:
            visit(reply, tree)

    for tree in trees:
        visit(tree["prompt"], tree)
    return rows


def write_oasst1(path: Path) -> None:
    with gzip.open(DATA / "oasst_sample.jsonl.gz", "rt", encoding="utf-8") as lines:
        trees = [json.loads(line) for _, line in zip(range(OASST1_TREES), lines)]
    shutil.rmtree(path, ignore_errors=True)
    datasets.Dataset.from_list(oasst1_rows(trees), features=OASST1_FEATURES).save_to_disk(str(path))


def main() -> None:
    rng = random.Random(SEED)
    write_text(DATA / "dolly_sample.jsonl", jsonl(dolly_rows(rng)))
    # The alpaca release is one JSON array, indented by 4.
    write_text(DATA / "alpaca_sample.json", json.dumps(alpaca_rows(rng), indent=4, ensure_ascii=False) + "\n")
    write_gzip(DATA / "hh_rlhf_sample.jsonl.gz", jsonl(hh_rows()))
    write_text(DATA / "chat_sample.jsonl", jsonl(chat_rows(rng)))
    write_text(DATA / "preference_sample.jsonl", jsonl(preference_rows()))
    # Wrapped like most text files, so a document spans several lines.
    write_text(DATA / "text_sample.txt", "\n\n".join(textwrap.fill(p, width=100) for p in paragraphs()) + "\n")
    write_oasst1(DATA / "oasst1_sample")
    write_natural_instructions(DATA / "natural_instructions_sample", DATA / "natural_instructions_sample.jsonl")
    for name in ("dolly_sample.jsonl", "alpaca_sample.json", "hh_rlhf_sample.jsonl.gz", "chat_sample.jsonl",
                 "preference_sample.jsonl",
                 "text_sample.txt", "oasst1_sample", "natural_instructions_sample",
                 "natural_instructions_sample.jsonl"):  # fmt: skip
        path = DATA / name
        size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"wrote {path} ({size} bytes)")


if __name__ == "__main__":
    main()
