"""The data sources of model_training/data/sources/: each one loads its bundled sample through the real config,
splits it, and names the file, line and field of a malformed record (or skips it); then the rules of each format.
A new source is one row of CASES."""

import gzip
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model_training.config import load_config, parse_override
from model_training.data.formatting import IGNORE_INDEX
from model_training.data.oasst import FileFormatError, Message, load_oasst_export
from model_training.data.prepare import prepare_data
from model_training.data.records import Conversation, Record, TextDocument
from model_training.data.sources import SOURCES
from model_training.data.sources.common import DatasetConfig, FilterReport, LoadContext, Splits, split_by_record
from model_training.data.sources.rows import read_rows
from model_training.models.builder import load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data"


def load(name: str, path: str | Path, **options: object) -> Splits:
    """`name`'s load of `path` with `options`, as `prepare_data` calls it."""
    source = SOURCES[name]
    context = LoadContext(FilterReport(name), f"datasets[0].{name}.input_file_path")
    return source.load(path, source.options(**options), context)


def records(name: str, path: str | Path, **options: object) -> list[Record]:
    """Every record of `path`, in order: nothing held out."""
    train, val = load(name, path, val_split=0.0, **options)
    assert val == []
    return train


def write_jsonl(path: Path, rows: list[object], blank_after_first: bool = False) -> Path:
    lines = [json.dumps(row) for row in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pair(prompt: str, reply: str, name: str, index: int = 1) -> tuple[Message, ...]:
    return (
        Message(role="prompter", text=prompt, message_id=f"{name}:{index}:1"),
        Message(role="assistant", text=reply, message_id=f"{name}:{index}:2"),
    )


def texts(conversation: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in conversation.messages]


def chat(*turns: tuple[str, str], **fields: object) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **fields}


# --- every source ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What every source is tested with."""

    sample: str
    """The bundled sample in data/, in the source's real field layout."""
    good: list[dict]
    """JSON Lines records that give exactly one conversation or document."""
    bad: dict
    """A record that lacks a field the source requires ..."""
    reason: str
    """... and what the error says about it."""


ROOT = {"message_id": "p", "message_tree_id": "p", "tree_state": "ready_for_export", "text": "Hi?", "role": "prompter",
        "lang": "en", "review_result": True}  # fmt: skip
REPLY = {"message_id": "a", "parent_id": "p", "message_tree_id": "p", "text": "Hello.", "role": "assistant"}
TREE = {"message_tree_id": "p", "tree_state": "ready_for_export",
        "prompt": {**ROOT, "replies": [{key: REPLY[key] for key in ("message_id", "text", "role")}]}}  # fmt: skip
NI_ROW = {"task_name": "task1_greeting", "id": "task1-0", "definition": "Greet back.", "inputs": "Hi.",
          "targets": "Hello."}  # fmt: skip

CASES = {
    "oasst_export": Case("oasst_sample.jsonl.gz", [TREE], {"message_tree_id": "q", "tree_state": "ready_for_export"},
                         "lacks required field 'prompt' (expected one message tree per line)"),
    # A malformed row drops its whole tree: the bad row is the root of a second tree.
    "oasst1": Case("oasst1_sample", [ROOT, REPLY], {**ROOT, "message_id": "q", "message_tree_id": "q", "text": None},
                   "message q lacks required field 'text'"),
    "dolly15k": Case("dolly_sample.jsonl", [{"instruction": "Hi.", "context": "", "response": "Hello.",
                                             "category": "open_qa"}],
                     {"instruction": "Hi.", "context": ""}, "missing field 'response'"),
    "alpaca": Case("alpaca_sample.json", [{"instruction": "Hi.", "input": "", "output": "Hello."}],
                   {"instruction": "Hi.", "input": ""}, "missing field 'output'"),
    "hh_rlhf": Case("hh_rlhf_sample.jsonl.gz", [{"chosen": "\n\nHuman: Hi.\n\nAssistant: Hello.",
                                                 "rejected": "\n\nHuman: Hi.\n\nAssistant: No."}],
                    {"rejected": "\n\nHuman: Hi.\n\nAssistant: No."}, "missing field 'chosen'"),
    "chat_jsonl": Case("chat_sample.jsonl", [chat(("user", "Hi."), ("assistant", "Hello."))], {"lang": "en"},
                       "missing field 'messages'"),
    "text": Case("text_sample.txt", [{"text": "Hello."}], {"title": "Hello"}, "missing field 'text'"),
    # Another instance: a second row of the same id would be another output of the first, and not read.
    "natural_instructions": Case("natural_instructions_sample", [NI_ROW],
                                 {"task_name": "task1_greeting", "id": "task1-1", "definition": "Greet back."},
                                 "missing field 'targets'"),
}  # fmt: skip


def test_every_source_has_a_case() -> None:
    """Every source of conversations; the ranked replies of the preference stages: tests/data/test_preferences.py."""
    assert set(CASES) == {name for name, source in SOURCES.items() if source.load is not None}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_config(["defaults", "tiny-falcon", "oasst-sample"]))


def prepared(tokenizer, datasets: str, *overrides: str):
    overrides = (f"datasets={datasets}", "data_cache_dir=null", *overrides)
    return prepare_data(load_config(["defaults", "tiny-falcon"], [parse_override(o) for o in overrides]), tokenizer)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_source_loads_its_bundled_sample(tokenizer, name: str) -> None:
    data = prepared(tokenizer, f"[{{{name}: {{input_file_path: {CASES[name].sample}, val_split: 0.2}}}}]")
    (train,), (val,) = data.train, data.val
    assert train.name == val.name == name
    assert len(train.samples) > 10 and len(val.samples) >= 1
    assert all(s.num_supervised > 0 for s in [*train.samples, *val.samples])
    # Samples stay whole (they are cut when batches are built); the stats count those over max_length (256).
    assert train.truncated == sum(len(s.input_ids) > 256 for s in train.samples)
    report = data.reports[0]
    # The OASST loads leave out other languages themselves; the count is the same as for the other sources.
    assert report.records == train.threads + val.threads + report.other_language + report.duplicates
    assert (report.other_language > 0) == name.startswith("oasst")  # the OASST samples hold other languages


@pytest.mark.parametrize("name", sorted(set(CASES) - {"text"}))
def test_label_masks_hold_for_every_conversation_source(tokenizer, name: str) -> None:
    data = prepared(tokenizer, f"[{{{name}: {{input_file_path: {CASES[name].sample}, val_split: 0.0}}}}]")
    for sample in data.train[0].samples:
        assert sample.labels[0] == IGNORE_INDEX  # a role token starts every conversation
        assert sample.labels[-1] == tokenizer.eos_token_id  # every sample ends with a supervised eos


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_malformed_record_names_file_line_and_field_or_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    case = CASES[name]
    # The blank line after the first record must not shift the line number of the bad one.
    path = write_jsonl(tmp_path / f"{name}.jsonl", [*case.good, case.bad], blank_after_first=True)
    line = len(case.good) + 2
    with pytest.raises(FileFormatError) as error:
        records(name, path)
    assert str(error.value) == f"{path}, line {line}: {case.reason}"
    assert (error.value.path, error.value.line) == (path, line)
    with caplog.at_level(logging.WARNING):
        kept = records(name, path, skip_invalid=True)
    assert len(kept) == 1
    assert "skipped 1 invalid" in caplog.text


def test_split_by_record_holds_out_by_position_with_the_seed() -> None:
    numbers = list(range(30))
    train, val = split_by_record(numbers, DatasetConfig(val_split=0.2, manual_seed=7))
    assert len(val) == 6 and sorted(train + val) == numbers
    assert train == sorted(train) and val == sorted(val)  # each side keeps the order
    # The rule: the records' keys shuffled by Python's random.Random(seed), the first round(n * val_split) held out.
    keys = [f"record:{n:09d}" for n in numbers]
    random.Random(7).shuffle(keys)
    assert val == sorted(int(key.split(":")[1]) for key in keys[:6])
    assert split_by_record(numbers, DatasetConfig(val_split=0.2, manual_seed=8))[1] != val


# --- the bundled samples ---------------------------------------------------------------------------------------


def test_dolly_sample() -> None:
    conversations = records("dolly15k", DATA / "dolly_sample.jsonl")
    assert len(conversations) == 56
    assert conversations[0] == Conversation(
        messages=pair("What is the capital of France?", "The capital of France is Paris.", "dolly15k")
    )
    # A closed_qa row: the context follows the instruction after a blank line.
    assert texts(conversations[2]) == [
        ("prompter", "What currency is used in Japan?\n\nJapan is a country in Asia. Its capital is Tokyo. The main "
         "language spoken there is Japanese, and its currency is the yen."),
        ("assistant", "Japan uses the yen."),
    ]  # fmt: skip
    assert all(c.system is None and c.lang is None for c in conversations)


def test_alpaca_sample_as_json_array_and_as_jsonl(tmp_path: Path) -> None:
    conversations = records("alpaca", DATA / "alpaca_sample.json")
    assert len(conversations) == 45
    assert conversations[0] == Conversation(
        messages=pair("What is the capital of France?", "The capital of France is Paris.", "alpaca")
    )
    # A record with an input: it follows the instruction after a blank line.
    assert texts(conversations[1]) == [
        ("prompter", "Name the capital city of the given country.\n\nJapan"),
        ("assistant", "Tokyo is the capital of Japan."),
    ]
    rows = json.loads((DATA / "alpaca_sample.json").read_text())
    assert records("alpaca", write_jsonl(tmp_path / "alpaca.jsonl", rows)) == conversations


def test_dolly_and_alpaca_samples_share_exactly_one_conversation() -> None:
    dolly = {tuple(texts(c)) for c in records("dolly15k", DATA / "dolly_sample.jsonl")}
    alpaca = {tuple(texts(c)) for c in records("alpaca", DATA / "alpaca_sample.json")}
    assert dolly & alpaca == {
        (("prompter", "What is the capital of France?"), ("assistant", "The capital of France is Paris."))
    }


def test_hh_rlhf_sample() -> None:
    conversations = records("hh_rlhf", DATA / "hh_rlhf_sample.jsonl.gz")
    assert len(conversations) == 35
    assert texts(conversations[0]) == [
        ("prompter", "How can I sleep better?"),
        ("assistant", "Here are a few things that help:\n\n- Go to bed and get up at the same time every day.\n"
         "- Keep your bedroom dark, quiet and cool.\n- Avoid coffee and large meals in the evening.\n\n"
         "Would you like more detail on any of them?"),
    ]  # fmt: skip
    assert [len(c.messages) for c in conversations[4:6]] == [4, 4]  # the recipe dialogues have two rounds
    quoted = [c for c in conversations if "Human: hello" in c.messages[0].text]
    assert len(quoted) == 1 and len(quoted[0].messages) == 2


def test_chat_sample() -> None:
    conversations = records("chat_jsonl", DATA / "chat_sample.jsonl")
    assert len(conversations) == 40
    first = conversations[0]
    assert first.system == "You are a helpful assistant." and first.lang == "en"
    assert texts(first) == [
        ("prompter", "Which continent is France in?"),
        ("assistant", "France is in Europe."),
        ("prompter", "And what currency do they use?"),
        ("assistant", "France uses the euro."),
    ]
    assert [m.message_id for m in first.messages] == ["chat:1:1", "chat:1:2", "chat:1:3", "chat:1:4"]
    raw = [json.loads(line) for line in (DATA / "chat_sample.jsonl").read_text().splitlines()]
    systems = [r["messages"][0]["content"] if r["messages"][0]["role"] == "system" else None for r in raw]
    assert [c.system for c in conversations] == systems and 0 < systems.count(None) < len(systems)
    assert [c.lang for c in conversations] == [r.get("lang") for r in raw]
    # The sample's trailing user turns are dropped, so every conversation ends with an assistant.
    assert sum(r["messages"][-1]["role"] == "user" for r in raw) == 2
    assert all(c.messages[-1].role == "assistant" for c in conversations)


def test_text_sample() -> None:
    documents = records("text", DATA / "text_sample.txt")
    assert len(documents) == 32
    assert documents[0] == TextDocument(
        "France is a country in Europe. Its capital is Paris. The main language spoken there is French, and\n"
        "its currency is the euro."
    )


def flat_rows_as_jsonl(folder: Path, path: Path) -> Path:
    """The rows of a saved oasst1 folder, written as a flat oasst1 JSON Lines export."""
    return write_jsonl(path, list(datasets.load_from_disk(str(folder))))


@pytest.mark.parametrize(("lang", "top_k"), [("en", None), ("en,de,es", 1)])
def test_oasst1_folder_gives_the_threads_of_load_oasst_export(tmp_path: Path, lang: str, top_k: int | None) -> None:
    folder = DATA / "oasst1_sample"
    conversations = records("oasst1", folder, lang=lang, top_k=top_k)
    threads, _ = load_oasst_export(
        flat_rows_as_jsonl(folder, tmp_path / "flat.jsonl"), lang=lang, top_k=top_k, val_split=0.0
    )
    assert conversations and [list(c.messages) for c in conversations] == threads
    assert [c.lang for c in conversations] == [t[0].lang for t in threads]
    if lang == "en":
        assert {c.lang for c in conversations} == {"en"}
    else:
        assert {"de", "es"} <= {c.lang for c in conversations}


def test_oasst1_reads_flat_jsonl_and_names_the_line_of_a_bad_row(tmp_path: Path) -> None:
    rows = [
        {"message_id": "p", "message_tree_id": "p", "tree_state": "ready_for_export", "text": "Hi?",
         "role": "prompter", "lang": "en", "review_result": True},
        {"message_id": "a", "parent_id": "p", "message_tree_id": "p", "text": "Hello.", "role": "assistant"},
        {"message_id": "b", "parent_id": "nowhere", "message_tree_id": "p", "text": "Hey.", "role": "assistant"},
    ]  # fmt: skip
    good = records("oasst1", write_jsonl(tmp_path / "good.jsonl", rows[:2]))
    assert [texts(c) for c in good] == [[("prompter", "Hi?"), ("assistant", "Hello.")]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows, blank_after_first=True)
    with pytest.raises(FileFormatError, match=r"bad\.jsonl, line 4: message b: parent nowhere does not appear"):
        records("oasst1", path)
    assert records("oasst1", path, skip_invalid=True) == []  # the bad row drops its whole tree


# --- format rules ----------------------------------------------------------------------------------------------


def test_dolly_and_alpaca_join_only_a_non_blank_context(tmp_path: Path) -> None:
    dolly = [
        {"instruction": "Say hi.", "context": "  \n", "response": "Hi.", "category": "open_qa"},
        {"instruction": "Say hi.", "response": "Hi."},  # no context field at all
        {"instruction": "Sum up.", "context": "A text.", "response": "Short.", "category": "summarization"},
    ]
    assert [c.messages[0].text for c in records("dolly15k", write_jsonl(tmp_path / "d.jsonl", dolly))] == [
        "Say hi.", "Say hi.", "Sum up.\n\nA text."
    ]  # fmt: skip
    alpaca = [{"instruction": "Reverse it.", "input": "abc", "output": "cba"}, {"instruction": "Hi.", "output": "Hi!"}]
    assert [texts(c) for c in records("alpaca", write_jsonl(tmp_path / "a.jsonl", alpaca))] == [
        [("prompter", "Reverse it.\n\nabc"), ("assistant", "cba")],
        [("prompter", "Hi."), ("assistant", "Hi!")],
    ]


@pytest.mark.parametrize(
    ("chosen", "expected"),
    [
        ("\n\nHuman: Hi\n\nAssistant: Hello there.", [("prompter", "Hi"), ("assistant", "Hello there.")]),
        # Real rows seldom lack the leading blank line, but it is not needed.
        ("Human: Hi\n\nAssistant: Hello.", [("prompter", "Hi"), ("assistant", "Hello.")]),
        # A marker not after a blank line is text; a blank line without a marker stays inside the turn.
        ("\n\nHuman: It said Human: stop\nAssistant: ok\n\nAssistant: Odd.\n\nSure.",
         [("prompter", "It said Human: stop\nAssistant: ok"), ("assistant", "Odd.\n\nSure.")]),
        ("\n\nHuman:  A \n\nAssistant:B\n\nHuman: C\n\nAssistant: D\n",
         [("prompter", "A"), ("assistant", "B"), ("prompter", "C"), ("assistant", "D")]),
    ],
)  # fmt: skip
def test_hh_rlhf_parses_turns(tmp_path: Path, chosen: str, expected: list[tuple[str, str]]) -> None:
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": "\n\nHuman: x\n\nAssistant:"}])
    assert [texts(c) for c in records("hh_rlhf", path)] == [expected]


@pytest.mark.parametrize(
    ("chosen", "reason"),
    [
        ("\n\nHuman: Hi\n\nAssistant:", "turn 2 (Assistant) is empty"),
        ("\n\nHuman: \n\nAssistant: Hello.", "turn 1 (Human) is empty"),
        ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye.", "turn 3 (Human) is last"),
        ("\n\nAssistant: Hello.", "turn 1 (Assistant) is out of order"),
        ("\n\nHuman: Hi\n\nHuman: Anyone?\n\nAssistant: Yes.", "turn 2 (Human) is out of order"),
        ("Hello there.", "field 'chosen' has no 'Human:' or 'Assistant:' turn marker"),
        ("Preamble\n\nHuman: Hi\n\nAssistant: Hello.", "field 'chosen' has text before its first turn marker"),
    ],
)
def test_hh_rlhf_rejects_a_dialogue_that_does_not_alternate(tmp_path: Path, chosen: str, reason: str) -> None:
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello."}, {"chosen": chosen}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(FileFormatError, match=rf"hh\.jsonl, line 2: {re.escape(reason)}"):
        records("hh_rlhf", path)
    assert len(records("hh_rlhf", path, skip_invalid=True)) == 1


def test_chat_jsonl_system_lang_and_trailing_user(tmp_path: Path) -> None:
    rows = [
        chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), lang="en"),
        chat(("system", " "), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")),
    ]
    first, second = records("chat_jsonl", write_jsonl(tmp_path / "chat.jsonl", rows))
    assert first.system == "Be brief." and first.lang == "en"
    assert texts(first) == [("prompter", "Hi"), ("assistant", "Hello.")]
    # A blank system message is no system message; the unanswered last user turn is dropped.
    assert second.system is None and second.lang is None
    assert texts(second) == [("prompter", "Hi"), ("assistant", "Hello.")]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (chat(("user", "Hi"), ("system", "Late."), ("assistant", "Hello.")), "message 2 is a system message"),
        (chat(("user", "Hi"), ("user", "Hello?"), ("assistant", "Yes.")), r"message 2 \(user\) is out of order"),
        (chat(("assistant", "Hello."), ("user", "Hi")), r"message 1 \(assistant\) is out of order"),
        (chat(("user", "Hi"), ("tool", "{}")), "message 2 has unknown role 'tool'"),
        (chat(("user", "Hi"), ("assistant", "")), r"message 2 \(assistant\) is empty"),
        (chat(("user", "Hi")), "no prompter/assistant turns"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}, "message 2 lacks field 'content'"),
        ({"conversation": []}, "missing field 'messages'"),
    ],
)
def test_chat_jsonl_names_the_line_and_the_fault(tmp_path: Path, record: dict, reason: str) -> None:
    rows = [chat(("user", "Hi"), ("assistant", "Hello.")), record]
    path = write_jsonl(tmp_path / "chat.jsonl", rows, blank_after_first=True)
    with pytest.raises(FileFormatError, match=rf"chat\.jsonl, line 3: {reason}"):
        records("chat_jsonl", path)


def test_text_file_documents_are_separated_by_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    path.write_text("\n\nFirst line\n  indented second line\n\n \t \n\n\nSecond doc\n\nThird doc", encoding="utf-8")
    assert records("text", path) == [
        TextDocument("First line\n  indented second line"), TextDocument("Second doc"), TextDocument("Third doc")
    ]  # fmt: skip


def test_text_jsonl_skips_blank_documents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "One.\n\nStill one."}, {"text": "  "}, {"text": "Two."}])
    assert records("text", path) == [TextDocument("One.\n\nStill one."), TextDocument("Two.")]


# --- errors, skipping, sources ---------------------------------------------------------------------------------

GOOD = {name: case.good[0] for name, case in CASES.items()}


@pytest.mark.parametrize(("value", "reason"), [(5, "field 'response' must be a string, got int"),
                                               ("   ", "field 'response' is empty")])  # fmt: skip
def test_a_wrong_or_empty_field_is_invalid(tmp_path: Path, value: object, reason: str) -> None:
    path = write_jsonl(tmp_path / "dolly.jsonl", [GOOD["dolly15k"], {**GOOD["dolly15k"], "response": value}])
    with pytest.raises(FileFormatError, match=f"dolly.jsonl, line 2: {reason}"):
        records("dolly15k", path)


def test_records_of_a_json_array_and_rows_of_parquet_are_numbered(tmp_path: Path) -> None:
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps([GOOD["alpaca"], {"instruction": "Hi.", "input": ""}], indent=4))
    with pytest.raises(FileFormatError, match=r"alpaca\.json, record 2: missing field 'output'"):
        records("alpaca", array)
    parquet = tmp_path / "dolly.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD["dolly15k"], {**GOOD["dolly15k"], "response": None}]), parquet)
    with pytest.raises(FileFormatError, match=r"dolly\.parquet, row 2: missing field 'response'"):
        records("dolly15k", parquet)


def test_broken_json_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "dolly.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write(json.dumps(GOOD["dolly15k"]) + "\n\n" + '{"instruction": "Hi.", "response": \n')
    with pytest.raises(FileFormatError, match=r"dolly\.jsonl\.gz, line 3: invalid JSON"):
        records("dolly15k", path)


def test_a_file_that_is_one_json_object_is_not_taken_for_records(tmp_path: Path) -> None:
    wrapped = tmp_path / "alpaca.json"
    wrapped.write_text(json.dumps({"data": [GOOD["alpaca"]]}, indent=2))
    with pytest.raises(FileFormatError, match=r"alpaca\.json, line 1: the file is a single JSON object \(keys "
                       r"'data'\), not records \(missing field 'instruction'\); expected a JSON list of records or "
                       r"JSON Lines"):
        records("alpaca", wrapped)
    one_record = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi."}])
    with pytest.raises(FileFormatError, match=r"alpaca\.jsonl, line 1: missing field 'output'$"):
        records("alpaca", one_record)


def cut_gzip(rows: list[dict]) -> bytes:
    """Many copies of `rows` as JSON Lines, gzipped and cut in the middle, as an interrupted copy leaves a .gz file."""
    data = gzip.compress("".join(json.dumps(row) + "\n" for row in rows * 500).encode())
    return data[: len(data) // 2]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda case: b"not gzip at all\n", r", line 1: not gzip data; expected a gzip-compressed file \(\.gz\)$"),
        # Records of the source's own layout before the cut: a reader that streams meets them first.
        (lambda case: cut_gzip(case.good), r", line \d+: the gzip data ends early or is damaged"),
    ],
    ids=["not gzip", "cut short"],
)
def test_a_damaged_gz_file_names_the_file_and_what_was_expected(
    tmp_path: Path, name: str, damage: Callable[[Case], bytes], reason: str
) -> None:
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(damage(CASES[name]))
    with pytest.raises(FileFormatError, match=re.escape(str(path)) + reason):
        records(name, path)


def test_skip_invalid_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [GOOD["dolly15k"], {"instruction": "No reply."}, GOOD["dolly15k"], {"response": "No prompt."}]
    path = write_jsonl(tmp_path / "dolly.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        conversations = records("dolly15k", path, skip_invalid=True)
    assert [c.messages[0].message_id for c in conversations] == ["dolly15k:1:1", "dolly15k:3:1"]
    assert f"skipped 2 invalid record(s) in {path}" in caplog.text


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_missing_file_names_the_path_and_the_config_key(tmp_path: Path, name: str) -> None:
    path = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"{path} \(set by datasets\[0\]\.{name}\.input_file_path\)"):
        records(name, path)


def test_a_hub_id_goes_to_load_dataset_and_a_local_looking_path_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_load_dataset(path: str, **kwargs: object) -> datasets.Dataset:
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([GOOD["alpaca"], {"instruction": "Hi."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    with pytest.raises(FileFormatError, match=r"^tatsu-lab/alpaca, row 2: missing field 'output'"):
        records("alpaca", "tatsu-lab/alpaca")
    assert calls == [("tatsu-lab/alpaca", {"split": "train"})]
    for local in ("local/alpaca", "elsewhere/alpaca.json"):
        with pytest.raises(FileNotFoundError, match=local):
            records("alpaca", local)
    assert len(calls) == 1


def test_a_saved_dataset_dict_folder_is_read_by_split(tmp_path: Path) -> None:
    splits = {"train": [GOOD["chat_jsonl"]], "validation": [chat(("user", "Yes?"), ("assistant", "No."))] * 2}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp_path / "ds")
    assert list(read_rows(tmp_path / "ds", None, split="validation").rows) == splits["validation"]
    train_only = records("chat_jsonl", tmp_path / "ds")  # a source reads the train split
    assert [texts(c) for c in train_only] == [[("prompter", "Hi."), ("assistant", "Hello.")]]
    with pytest.raises(ValueError, match="has no split 'test'; its splits are train, validation"):
        read_rows(tmp_path / "ds", None, split="test")


def test_an_unsupported_file_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dolly.csv"
    shutil.copy(DATA / "dolly_sample.jsonl", path)
    with pytest.raises(ValueError, match="unsupported file type"):
        records("dolly15k", path)



# --- natural_instructions --------------------------------------------------------------------------------------

NI_TASKS = DATA / "natural_instructions_sample"
NI_ROWS = DATA / "natural_instructions_sample.jsonl"


def task_file(path: Path, **fields: object) -> Path:
    """A task file with a one-line definition and `fields` (the instances) over the sample's first task."""
    task = {**json.loads(sorted(NI_TASKS.glob("*.json"))[0].read_text()), **fields}
    path.write_text(json.dumps(task, indent=4), encoding="utf-8")
    return path


def test_natural_instructions_sample_gives_the_same_records_in_both_layouts() -> None:
    tasks = [json.loads(path.read_text()) for path in sorted(NI_TASKS.glob("*.json"))]
    rows = [json.loads(line) for line in NI_ROWS.read_text().splitlines()]
    from_tasks = records("natural_instructions", NI_TASKS)
    assert records("natural_instructions", NI_ROWS) == from_tasks
    instances = [(task, instance) for task in tasks for instance in task["Instances"]]
    assert len(from_tasks) == len(instances) == 42 and len(rows) == 45  # three instances have two outputs
    for conversation, (task, instance) in zip(from_tasks, instances):
        # The definition, a blank line, the input; the first output is the reply.
        assert texts(conversation) == [("prompter", f"{task['Definition'][0]}\n\n{instance['input']}"),
                                       ("assistant", instance["output"][0])]
    assert [m.message_id for m in from_tasks[1].messages] == ["natural_instructions:2:1", "natural_instructions:2:2"]
    # One task file alone is read too.
    first = sorted(NI_TASKS.glob("*.json"))[0]
    assert records("natural_instructions", first) == from_tasks[: len(tasks[0]["Instances"])]


def test_natural_instructions_keeps_at_most_max_instances_per_task() -> None:
    def task(conversation: Conversation) -> str:
        return conversation.messages[0].text.split("\n\n")[0]  # the definition names the task

    everything = records("natural_instructions", NI_TASKS)
    expected = [texts(c) for c in everything if [task(o) for o in everything[: everything.index(c)]].count(task(c)) < 3]
    for path in (NI_TASKS, NI_ROWS):
        kept = records("natural_instructions", path, max_instances_per_task=3)
        assert len(kept) == 12 and [texts(c) for c in kept] == expected  # four tasks, the first 3 of each


@pytest.mark.parametrize(
    ("instance", "reason"),
    [
        ({"id": "x", "input": "Country: Chad"}, "missing field 'output'"),
        ({"id": "x", "input": "Country: Chad", "output": "N'Djamena"}, "field 'output' must be a list of strings"),
        ({"id": "x", "input": "Country: Chad", "output": []}, "field 'output' is empty"),
        ({"id": "x", "input": "Country: Chad", "output": [" "]}, "field 'output' is empty"),
        ({"input": "Country: Chad", "output": ["N'Djamena"]}, "missing field 'id'"),
        (["Country: Chad"], "expected a JSON object, got list"),
    ],
)
def test_a_malformed_instance_names_the_task_file_and_the_instance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, instance: object, reason: str
) -> None:
    good = {"id": "task1-1", "input": "Country: Mali", "output": ["Bamako"]}
    path = task_file(tmp_path / "task1_capitals.json", Instances=[good, instance, good | {"id": "task1-3"}])
    with pytest.raises(FileFormatError) as error:
        records("natural_instructions", path)
    assert str(error.value) == f"{path}, instance 2: {reason}"
    with caplog.at_level(logging.WARNING):
        assert len(records("natural_instructions", path, skip_invalid=True)) == 2
    assert f"skipped 1 invalid record(s) in {path}" in caplog.text


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"Definition": None}, "missing field 'Definition'"),
        ({"Definition": "Answer."}, "field 'Definition' must be a list of strings"),
        ({"Definition": [" "]}, "field 'Definition' is empty"),
        ({"Instances": None}, "missing field 'Instances'"),
        ({"Instances": {"id": "x"}}, "field 'Instances' must be a list"),
    ],
)
def test_a_task_file_without_definition_or_instances_is_an_error_of_the_file(
    tmp_path: Path, fields: dict, reason: str
) -> None:
    path = task_file(tmp_path / "task1_capitals.json", **fields)
    # A fault of the file as a whole, not of one record: skip_invalid does not skip it.
    with pytest.raises(FileFormatError) as error:
        records("natural_instructions", path, skip_invalid=True)
    assert str(error.value) == f"{path}: {reason}"


def test_a_task_file_that_is_not_a_task_names_the_line_or_what_was_expected(tmp_path: Path) -> None:
    broken = tmp_path / "task1_broken.json"
    broken.write_text('{\n    "Definition": ["Answer."],\n    "Instances": [\n        {"id": "x",}\n    ]\n}\n')
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(broken))}, line 4: invalid JSON \(Expecting "
                       r"property name enclosed in double quotes at column 20\)$"):
        records("natural_instructions", broken)
    array = tmp_path / "task2_array.json"
    array.write_text(json.dumps([NI_ROW]))
    with pytest.raises(FileFormatError, match=r"task2_array\.json: expected one task, a JSON object with 'Definition' "
                       r"and 'Instances'; got a JSON list$"):
        records("natural_instructions", array)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError, match=r"empty: holds no task files \(\*\.json\)"):
        records("natural_instructions", tmp_path / "empty")


def test_flat_natural_instructions_rows_read_each_instance_once(tmp_path: Path) -> None:
    """The flat rows repeat an instance once per output: the first row of an id is its record, in every layout a
    `datasets` folder or parquet file holds too."""
    rows = [NI_ROW, NI_ROW | {"targets": "Hi there."}, NI_ROW | {"id": "task1-1", "inputs": "Hello."}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for path in (write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "saved", tmp_path / "rows.parquet"):
        assert [texts(c) for c in records("natural_instructions", path)] == [
            [("prompter", "Greet back.\n\nHi."), ("assistant", "Hello.")],
            [("prompter", "Greet back.\n\nHello."), ("assistant", "Hello.")],
        ]
