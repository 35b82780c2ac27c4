"""Write data/oasst_sample.jsonl.gz, a small synthetic OASST export in the real message-tree schema.

The texts come from small fact tables so that a tiny model trained on them visibly learns (the same questions
recur with the same answers). The tree shapes exercise what real exports contain: ranked and unranked sibling
replies, multi-turn threads, deleted and synthetic messages, trees that are not ready for export, prompts that
failed review, and nodes that leave out optional fields.

Run as `python data/make_oasst_sample.py`; the output is byte-for-byte the same on every run.
"""

from __future__ import annotations

import gzip
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "oasst_sample.jsonl.gz"
SEED = 20230415
TREES_PER_LANG = {"en": 210, "de": 22, "es": 18, "fr": 18}
NOT_READY_STATES = ["growing", "aborted_low_grade", "halted_by_moderator", "backlog_ranking"]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Brazil", "Brasilia"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Peru", "Lima"), ("India", "New Delhi"),
    ("Mexico", "Mexico City"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Sweden", "Stockholm"), ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok"), ("Chile", "Santiago"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("Finland", "Helsinki"),
    ("Vietnam", "Hanoi"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Colombia", "Bogota"),
    ("Turkey", "Ankara"), ("Denmark", "Copenhagen"), ("Indonesia", "Jakarta"), ("Cuba", "Havana"),
    ("Switzerland", "Bern"), ("Belgium", "Brussels"), ("Iceland", "Reykjavik"), ("Ghana", "Accra"),
]  # fmt: skip

# (animal, number of legs, the verb for its sound)
ANIMALS = [
    ("dog", 4, "barks"), ("cat", 4, "meows"), ("cow", 4, "moos"), ("duck", 2, "quacks"),
    ("horse", 4, "neighs"), ("sheep", 4, "bleats"), ("owl", 2, "hoots"), ("lion", 4, "roars"),
    ("bee", 6, "buzzes"),
    ("frog", 4, "croaks"), ("snake", 0, "hisses"), ("chicken", 2, "clucks"), ("pig", 4, "oinks"),
    ("wolf", 4, "howls"), ("donkey", 4, "brays"), ("elephant", 4, "trumpets"), ("goose", 2, "honks"),
    ("mouse", 4, "squeaks"), ("crow", 2, "caws"), ("cricket", 6, "chirps"), ("turkey", 2, "gobbles"),
]  # fmt: skip

SCIENCE = [
    ("Why is the sky blue?",
     "Sunlight is scattered by the air, and blue light is scattered much more than red light. "
     "So when you look at the sky, blue light reaches your eyes from every direction."),
    ("What is water made of?",
     "A water molecule is made of two hydrogen atoms and one oxygen atom, so its formula is H2O."),
    ("At what temperature does water boil?",
     "At sea level, pure water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit."),
    ("At what temperature does water freeze?",
     "Pure water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit."),
    ("How many planets are in the solar system?",
     "There are eight planets in the solar system: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus "
     "and Neptune."),
    ("What is the largest planet in the solar system?",
     "Jupiter is the largest planet in the solar system. It is a gas giant."),
    ("Why do we have seasons?",
     "The Earth's axis is tilted. As the Earth goes around the Sun, each half of the planet gets more "
     "direct sunlight for part of the year, which makes summer, and less for the other part, which makes "
     "winter."),
    ("What do plants need to grow?",
     "Plants need light, water, air and nutrients from the soil. They use light to make their own food "
     "through photosynthesis."),
    ("What is photosynthesis?",
     "Photosynthesis is the process plants use to turn light, water and carbon dioxide into sugar and "
     "oxygen."),
    ("How far is the Moon from the Earth?",
     "The Moon is about 384,000 kilometers from the Earth on average."),
    ("What is the speed of light?",
     "Light travels at about 300,000 kilometers per second in a vacuum."),
    ("Why does ice float on water?",
     "Ice is less dense than liquid water, because its molecules are held in an open crystal structure. "
     "Things that are less dense than water float."),
    ("What is gravity?",
     "Gravity is the force that pulls objects with mass toward each other. It keeps us on the ground and "
     "keeps the Moon going around the Earth."),
    ("How many bones are in the human body?",
     "An adult human body has 206 bones."),
    ("What causes thunder?",
     "Lightning heats the air so quickly that it expands with a bang. That sound is thunder."),
    ("Why do leaves change color in autumn?",
     "In autumn trees stop making chlorophyll, the green pigment. As it fades, yellow and orange pigments "
     "that were hidden become visible."),
    ("What is an atom?",
     "An atom is the smallest unit of a chemical element. It has a nucleus of protons and neutrons, "
     "surrounded by electrons."),
    ("How does a rainbow form?",
     "A rainbow forms when sunlight enters raindrops, bends, reflects inside them and splits into its "
     "colors."),
    ("What is the boiling point of water in Kelvin?",
     "Water boils at about 373 Kelvin at sea level."),
]  # fmt: skip

# (word, meaning, example sentence)
DEFINITIONS = [
    ("ephemeral", "lasting for a very short time", "The beauty of the sunset was ephemeral."),
    ("benevolent", "kind and wanting to help others", "The benevolent teacher stayed late to help us."),
    ("candid", "honest and direct", "She gave a candid answer to the question."),
    ("diligent", "careful and working hard", "He is a diligent student who never misses homework."),
    ("frugal", "careful not to waste money", "My frugal uncle repairs his old shoes."),
    ("gregarious", "liking to be with other people", "Our gregarious neighbor knows everyone."),
    ("meticulous", "paying great attention to detail", "The meticulous painter checked every corner."),
    ("nostalgia", "a warm longing for the past", "The old song filled him with nostalgia."),
    ("resilient", "able to recover quickly from difficulties", "Children are often very resilient."),
    ("ubiquitous", "present everywhere", "Phones have become ubiquitous in modern life."),
    ("verbose", "using more words than needed", "The verbose report was forty pages long."),
    ("lucid", "clear and easy to understand", "The professor gave a lucid explanation."),
    ("ambiguous", "having more than one possible meaning", "The ending of the film was ambiguous."),
    ("tenacious", "not giving up easily", "The tenacious climber reached the summit."),
    ("pragmatic", "dealing with things in a practical way", "We need a pragmatic solution."),
    ("serene", "calm and peaceful", "The lake was serene in the early morning."),
    ("obsolete", "no longer used because something newer exists", "Typewriters are mostly obsolete."),
    ("eloquent", "speaking or writing well and clearly", "She gave an eloquent speech at the wedding."),
    ("vivid", "very bright or clear", "He had a vivid memory of his first bicycle."),
    ("reluctant", "not wanting to do something", "The cat was reluctant to take a bath."),
]  # fmt: skip

HOWTO = [
    ("boil an egg",
     ["Put the egg in a pot and cover it with cold water.", "Bring the water to a boil.",
      "Cook for 7 minutes for a firm yolk.", "Cool the egg in cold water before peeling it."]),
    ("make a cup of tea",
     ["Boil fresh water.", "Put a tea bag in a cup.", "Pour the hot water over the tea bag.",
      "Wait three to five minutes, then remove the bag."]),
    ("plant a tree",
     ["Dig a hole twice as wide as the roots.", "Place the tree in the hole.",
      "Fill the hole with soil and press it down.", "Water the tree well."]),
    ("learn a new language",
     ["Study a little every day.", "Learn the most common words first.",
      "Listen to native speakers.", "Practice speaking, even if you make mistakes."]),
    ("fall asleep faster",
     ["Go to bed at the same time every night.", "Avoid screens for an hour before bed.",
      "Keep your bedroom dark and cool.", "Do not drink coffee in the evening."]),
    ("write a good email",
     ["Use a clear subject line.", "Say what you want in the first sentence.",
      "Keep it short.", "Read it again before you send it."]),
    ("save money",
     ["Write down what you spend.", "Make a monthly budget.",
      "Put some money aside as soon as you are paid.", "Avoid buying things on impulse."]),
    ("change a flat tire",
     ["Stop in a safe place and turn on the hazard lights.",
      "Loosen the nuts, then lift the car with a jack.",
      "Remove the flat tire and put on the spare.", "Tighten the nuts and lower the car."]),
]  # fmt: skip

# Localized tables for the non-English trees: (question template, answer template, facts)
FOREIGN_CAPITALS = {
    "de": ("Was ist die Hauptstadt von {0}?", "Die Hauptstadt von {0} ist {1}.",
           [("Frankreich", "Paris"), ("Deutschland", "Berlin"), ("Italien", "Rom"), ("Spanien", "Madrid"),
            ("Japan", "Tokio"), ("Ägypten", "Kairo"), ("Polen", "Warschau"), ("Griechenland", "Athen")]),
    "es": ("¿Cuál es la capital de {0}?", "La capital de {0} es {1}.",
           [("Francia", "París"), ("Alemania", "Berlín"), ("Italia", "Roma"), ("España", "Madrid"),
            ("Japón", "Tokio"), ("Egipto", "El Cairo"), ("Polonia", "Varsovia"), ("Grecia", "Atenas")]),
    "fr": ("Quelle est la capitale {0} ?", "La capitale {0} est {1}.",
           [("de la France", "Paris"), ("de l'Allemagne", "Berlin"), ("de l'Italie", "Rome"),
            ("de l'Espagne", "Madrid"), ("du Japon", "Tokyo"), ("de l'Égypte", "Le Caire"),
            ("de la Pologne", "Varsovie"), ("de la Grèce", "Athènes")]),
}  # fmt: skip
FOREIGN_SUMS = {
    "de": ("Was ist {0} plus {1}?", "{0} plus {1} ist {2}."),
    "es": ("¿Cuánto es {0} más {1}?", "{0} más {1} es {2}."),
    "fr": ("Combien font {0} plus {1} ?", "{0} plus {1} font {2}."),
}
FOREIGN_THANKS = {"de": "Danke!", "es": "¡Gracias!", "fr": "Merci !"}
FOREIGN_UNSURE = {
    "de": "Das weiß ich leider nicht genau.",
    "es": "Lo siento, no estoy seguro.",
    "fr": "Désolé, je ne suis pas sûr.",
}


@dataclass(frozen=True)
class Topic:
    """One question with a best answer, worse alternatives and possible follow-up turns."""

    question: str
    answer: str
    alternatives: list[str]
    followups: list[tuple[str, str]]


def capital_topic(rng: random.Random) -> Topic:
    country, capital = rng.choice(CAPITALS)
    other, other_capital = rng.choice([c for c in CAPITALS if c[0] != country])
    question = rng.choice([
        "What is the capital of {}?", "Which city is the capital of {}?", "Tell me the capital of {}.",
        "What's the capital city of {}?",
    ]).format(country)  # fmt: skip
    wrong = rng.choice([c[1] for c in CAPITALS if c[1] != capital])
    return Topic(
        question=question,
        answer=f"The capital of {country} is {capital}.",
        alternatives=[
            f"{capital} is the capital city of {country}.",
            f"I think it is {wrong}, but I am not sure.",
        ],
        followups=[
            (f"And what is the capital of {other}?", f"The capital of {other} is {other_capital}."),
            ("Thanks! Can you answer in one word?", f"{capital}."),
        ],
    )


def animal_topic(rng: random.Random) -> Topic:
    animal, legs, sound = rng.choice(ANIMALS)
    legs_text = "no legs" if legs == 0 else f"{legs} legs"
    if rng.random() < 0.5:
        return Topic(
            question=rng.choice(["How many legs does a {} have?", "How many legs has a {}?"]).format(animal),
            answer=f"A {animal} has {legs_text}.",
            alternatives=[f"It has {legs_text}.", f"A {animal} usually has {legs + 2} legs."],
            followups=[(f"What sound does a {animal} make?", f"A {animal} {sound}.")],
        )
    return Topic(
        question=rng.choice(["What sound does a {} make?", "What noise does a {} make?"]).format(animal),
        answer=f"A {animal} {sound}.",
        alternatives=[f"The {animal} {sound}.", "Animals make many different sounds."],
        followups=[(f"How many legs does a {animal} have?", f"A {animal} has {legs_text}.")],
    )


def science_topic(rng: random.Random) -> Topic:
    question, answer = rng.choice(SCIENCE)
    return Topic(
        question=question,
        answer=answer,
        alternatives=[
            answer.split(". ")[0].rstrip(".") + ".",
            "That is a hard question. Science is complicated.",
        ],
        followups=[
            ("Can you explain it to a five year old?", "Sure! " + answer.split(". ")[0].rstrip(".") + ".")
        ],
    )


def arithmetic_topic(rng: random.Random) -> Topic:
    a, b = rng.randint(2, 60), rng.randint(2, 30)
    op, symbol, result = rng.choice([("plus", "+", a + b), ("minus", "-", a - b), ("times", "*", a * b)])
    question = rng.choice(["What is {} {} {}?", "Can you compute {} {} {}?", "How much is {} {} {}?"]).format(
        a, op, b
    )
    return Topic(
        question=question,
        answer=f"{a} {op} {b} is {result}.",
        alternatives=[f"{a} {symbol} {b} = {result}", f"{a} {op} {b} is {result + rng.randint(1, 9)}."],
        followups=[("And what is that times 2?", f"{result} times 2 is {result * 2}.")],
    )


def definition_topic(rng: random.Random) -> Topic:
    word, meaning, example = rng.choice(DEFINITIONS)
    question = rng.choice(
        ['What does the word "{}" mean?', 'What is the meaning of "{}"?', "Define {}."]
    ).format(word)
    return Topic(
        question=question,
        answer=f'"{word.capitalize()}" means {meaning}.',
        alternatives=[f"It means {meaning}.", "It is an English word."],
        followups=[("Can you use it in a sentence?", f"Sure: {example}")],
    )


def howto_topic(rng: random.Random) -> Topic:
    task, steps = rng.choice(HOWTO)
    numbered = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))
    return Topic(
        question=rng.choice(["How do I {}?", "How can I {}?", "What are the steps to {}?"]).format(task),
        answer=f"Here is how to {task}:\n{numbered}",
        alternatives=[" ".join(steps), f"To {task}, just search online for a guide."],
        followups=[("What is the most important step?", f"The most important step is: {steps[0]}")],
    )


def foreign_topic(rng: random.Random, lang: str) -> Topic:
    if rng.random() < 0.6:
        question, answer, facts = FOREIGN_CAPITALS[lang]
        (country, capital), (other, other_capital) = rng.sample(facts, 2)
        return Topic(
            question=question.format(country),
            answer=answer.format(country, capital),
            alternatives=[FOREIGN_UNSURE[lang]],
            followups=[(question.format(other), answer.format(other, other_capital))],
        )
    question, answer = FOREIGN_SUMS[lang]
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return Topic(
        question=question.format(a, b),
        answer=answer.format(a, b, a + b),
        alternatives=[answer.format(a, b, a + b + 1)],
        followups=[],
    )


ENGLISH_TOPICS: list[Callable[[random.Random], Topic]] = [
    capital_topic, animal_topic, science_topic, arithmetic_topic, definition_topic, howto_topic,
]  # fmt: skip


class TreeWriter:
    """Builds the nodes of one export; holds the random source so every id and date is reproducible."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def new_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def date(self) -> str:
        day, hour, minute, second, micro = (self.rng.randint(1, n) for n in (28, 23, 59, 59, 999999))
        return f"2023-02-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}+00:00"

    def node(self, role: str, text: str, lang: str, parent_id: str | None, **fields: object) -> dict:
        rng = self.rng
        synthetic = bool(fields.get("synthetic", False))
        node: dict = {"message_id": self.new_id()}
        if parent_id is not None:
            node["parent_id"] = parent_id
        node.update(
            user_id=self.new_id(),
            created_date=self.date(),
            text=text,
            role=role,
            lang=lang,
            review_count=rng.randint(3, 5),
            review_result=fields.get("review_result", True),
            deleted=bool(fields.get("deleted", False)),
            synthetic=synthetic,
            model_name="oasst-sft-1-pythia-12b" if synthetic else None,
            rank=fields.get("rank"),
            emojis={"+1": rng.randint(0, 6), "_skip_reply": rng.randint(0, 3)},
            labels={
                "spam": {"value": 0.0, "count": 3},
                "lang_mismatch": {"value": 0.0, "count": 3},
                "quality": {"value": round(rng.uniform(0.3, 1.0), 4), "count": 3},
                "helpfulness": {"value": round(rng.uniform(0.3, 1.0), 4), "count": 3},
            },
            replies=[],
        )
        # Real exports drop null and empty fields, and many nodes never got emojis, labels or a user id.
        for key in ("user_id", "created_date", "review_count", "emojis", "labels"):
            if rng.random() < 0.15:
                del node[key]
        for key in ("model_name", "rank", "review_result"):
            if node.get(key, 0) is None and rng.random() < 0.8:
                del node[key]
        if not node["deleted"] and not synthetic and rng.random() < 0.1:
            del node["deleted"], node["synthetic"]
        return node

    def reply_flags(self) -> dict:
        """Deleted and synthetic messages are rare but must appear in the sample."""
        roll = self.rng.random()
        return {"deleted": roll < 0.05, "synthetic": 0.05 <= roll < 0.09}

    def assistant_replies(self, parent: dict, lang: str, answer: str, alternatives: list[str]) -> list[dict]:
        rng = self.rng
        count = rng.choice([1, 1, 2, 2, 3])
        texts = [answer] + alternatives[: count - 1]
        ranked = count > 1 and rng.random() < 0.75
        replies = []
        for quality, text in enumerate(texts):
            rank = quality if ranked else None
            replies.append(
                self.node("assistant", text, lang, parent["message_id"], rank=rank, **self.reply_flags())
            )
        # The best answer should not always be the first reply, as in real trees.
        rng.shuffle(replies)
        return replies

    def tree(self, lang: str, topic: Topic) -> dict:
        rng = self.rng
        prompt_review = rng.random() >= 0.05
        prompt = self.node(
            "prompter", topic.question, lang, None, review_result=prompt_review, synthetic=rng.random() < 0.02
        )
        prompt["replies"] = self.assistant_replies(prompt, lang, topic.answer, topic.alternatives)
        for assistant in prompt["replies"]:
            if rng.random() < 0.4:
                assistant["replies"] = self.followups(assistant, lang, topic)
        drop_empty_replies(prompt, rng)
        ready = rng.random() < 0.88
        return {
            "message_tree_id": prompt["message_id"],
            "tree_state": "ready_for_export" if ready else rng.choice(NOT_READY_STATES),
            "prompt": prompt,
        }

    def followups(self, assistant: dict, lang: str, topic: Topic) -> list[dict]:
        """Prompter replies to an assistant; some get answers, some are left as trailing prompter leaves."""
        rng = self.rng
        thanks = FOREIGN_THANKS.get(lang, "Thank you, that helps!")
        options = topic.followups or [(thanks, "")]
        prompters = []
        for question, answer in rng.sample(options, min(len(options), rng.choice([1, 1, 2]))):
            prompter = self.node("prompter", question, lang, assistant["message_id"], **self.reply_flags())
            if answer and rng.random() < 0.8:
                unsure = FOREIGN_UNSURE.get(lang, "I don't know.")
                prompter["replies"] = self.assistant_replies(prompter, lang, answer, [unsure])
            prompters.append(prompter)
        if rng.random() < 0.3:
            prompters.append(
                self.node("prompter", thanks, lang, assistant["message_id"], **self.reply_flags())
            )
        return prompters


def drop_empty_replies(node: dict, rng: random.Random) -> None:
    """Some exporters leave out the empty `replies` list of a leaf; the loader must accept both."""
    for reply in node["replies"]:
        drop_empty_replies(reply, rng)
    if not node["replies"] and rng.random() < 0.3:
        del node["replies"]


def build_trees(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    writer = TreeWriter(rng)
    trees = []
    for lang, count in TREES_PER_LANG.items():
        for _ in range(count):
            topic = rng.choice(ENGLISH_TOPICS)(rng) if lang == "en" else foreign_topic(rng, lang)
            trees.append(writer.tree(lang, topic))
    rng.shuffle(trees)
    return trees


def main() -> None:
    lines = "".join(json.dumps(tree, ensure_ascii=False) + "\n" for tree in build_trees())
    # mtime=0 and an empty stored name make the gzip bytes identical on every run.
    with OUTPUT.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(lines.encode("utf-8"))
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
