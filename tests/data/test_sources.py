import gzip
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model_training.data.oasst import FileFormatError, Message, load_oasst_export
from model_training.data.sources import (
    LOADERS,
    Conversation,
    DatasetFormatError,
    TextDocument,
    load_alpaca,
    load_chat_jsonl,
    load_dolly15k,
    load_hh_rlhf,
    load_oasst1,
    load_text,
)

DATA = Path(__file__).resolve().parents[2] / "data"


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


# --- the bundled samples ---------------------------------------------------------------------------------------


def test_dolly_sample() -> None:
    stats: dict[str, int] = {}
    conversations = load_dolly15k(DATA / "dolly_sample.jsonl", stats=stats)
    assert stats == {"records": 56, "skipped_invalid": 0, "kept": 56}
    assert conversations[0] == Conversation(
        messages=pair("What is the capital of France?", "The capital of France is Paris.", "dolly15k")
    )
    # A closed_qa row: the context follows the instruction after a blank line.
    assert texts(conversations[2]) == [
        ("prompter", "What currency is used in Japan?\n\nJapan is a country in Asia. Its capital is Tokyo. The main "
         "language spoken there is Japanese, and its currency is the yen."),
        ("assistant", "Japan uses the yen."),
    ]  # fmt: skip
    assert all(c.system is None and c.lang is None and c.group is None for c in conversations)


def test_alpaca_sample_as_json_array_and_as_jsonl(tmp_path: Path) -> None:
    conversations = load_alpaca(DATA / "alpaca_sample.json")
    assert len(conversations) == 45
    assert conversations[0] == Conversation(
        messages=pair("What is the capital of France?", "The capital of France is Paris.", "alpaca")
    )
    # A record with an input: it follows the instruction after a blank line.
    assert texts(conversations[1]) == [
        ("prompter", "Name the capital city of the given country.\n\nJapan"),
        ("assistant", "Tokyo is the capital of Japan."),
    ]
    records = json.loads((DATA / "alpaca_sample.json").read_text())
    assert load_alpaca(write_jsonl(tmp_path / "alpaca.jsonl", records)) == conversations


def test_dolly_and_alpaca_samples_share_exactly_one_conversation() -> None:
    dolly = {tuple(texts(c)) for c in load_dolly15k(DATA / "dolly_sample.jsonl")}
    alpaca = {tuple(texts(c)) for c in load_alpaca(DATA / "alpaca_sample.json")}
    assert dolly & alpaca == {
        (("prompter", "What is the capital of France?"), ("assistant", "The capital of France is Paris."))
    }


def test_hh_rlhf_sample() -> None:
    conversations = load_hh_rlhf(DATA / "hh_rlhf_sample.jsonl.gz")
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
    conversations = load_chat_jsonl(DATA / "chat_sample.jsonl")
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
    stats: dict[str, int] = {}
    documents = load_text(DATA / "text_sample.txt", stats=stats)
    assert len(documents) == 32 and stats["kept"] == 32
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
    conversations = load_oasst1(folder, lang=lang, top_k=top_k)
    threads, _ = load_oasst_export(
        flat_rows_as_jsonl(folder, tmp_path / "flat.jsonl"), lang=lang, top_k=top_k, val_split=0.0
    )
    assert conversations and [list(c.messages) for c in conversations] == threads
    assert [c.lang for c in conversations] == [t[0].lang for t in threads]
    # The group is the message tree id, which the flat rows carry as the prompt's id here.
    assert [c.group for c in conversations] == [t[0].message_id for t in threads]
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
    good = load_oasst1(write_jsonl(tmp_path / "good.jsonl", rows[:2]))
    assert [texts(c) for c in good] == [[("prompter", "Hi?"), ("assistant", "Hello.")]]
    assert good[0].group == "p"
    path = write_jsonl(tmp_path / "bad.jsonl", rows, blank_after_first=True)
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl, line 4: message b: parent nowhere does not appear"):
        load_oasst1(path)
    stats: dict[str, int] = {}
    assert load_oasst1(path, skip_invalid=True, stats=stats) == []  # the bad row drops its whole tree
    assert stats == {"records": 3, "skipped_invalid": 1, "kept": 0, "other_language": 0}


# --- format rules ----------------------------------------------------------------------------------------------


def test_dolly_and_alpaca_join_only_a_non_blank_context(tmp_path: Path) -> None:
    dolly = [
        {"instruction": "Say hi.", "context": "  \n", "response": "Hi.", "category": "open_qa"},
        {"instruction": "Say hi.", "response": "Hi."},  # no context field at all
        {"instruction": "Sum up.", "context": "A text.", "response": "Short.", "category": "summarization"},
    ]
    assert [c.messages[0].text for c in load_dolly15k(write_jsonl(tmp_path / "d.jsonl", dolly))] == [
        "Say hi.", "Say hi.", "Sum up.\n\nA text."
    ]  # fmt: skip
    alpaca = [{"instruction": "Reverse it.", "input": "abc", "output": "cba"}, {"instruction": "Hi.", "output": "Hi!"}]
    assert [texts(c) for c in load_alpaca(write_jsonl(tmp_path / "a.jsonl", alpaca))] == [
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
    assert [texts(c) for c in load_hh_rlhf(path)] == [expected]


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
    with pytest.raises(DatasetFormatError, match=rf"hh\.jsonl, line 2: {re.escape(reason)}"):
        load_hh_rlhf(path)
    assert len(load_hh_rlhf(path, skip_invalid=True)) == 1


def chat(*turns: tuple[str, str], **fields: object) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **fields}


def test_chat_jsonl_system_lang_and_trailing_user(tmp_path: Path) -> None:
    rows = [
        chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), lang="en"),
        chat(("system", " "), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")),
    ]
    first, second = load_chat_jsonl(write_jsonl(tmp_path / "chat.jsonl", rows))
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
    with pytest.raises(DatasetFormatError, match=rf"chat\.jsonl, line 3: {reason}"):
        load_chat_jsonl(path)


def test_text_file_documents_are_separated_by_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    path.write_text("\n\nFirst line\n  indented second line\n\n \t \n\n\nSecond doc\n\nThird doc", encoding="utf-8")
    stats: dict[str, int] = {}
    assert load_text(path, stats=stats) == [
        TextDocument("First line\n  indented second line"), TextDocument("Second doc"), TextDocument("Third doc")
    ]  # fmt: skip
    assert stats == {"records": 11, "skipped_invalid": 0, "kept": 3}


def test_text_jsonl_skips_blank_documents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "One.\n\nStill one."}, {"text": "  "}, {"text": "Two."}])
    stats: dict[str, int] = {}
    assert load_text(path, stats=stats) == [TextDocument("One.\n\nStill one."), TextDocument("Two.")]
    assert stats == {"records": 3, "skipped_invalid": 0, "kept": 2}


# --- errors, skipping, sources ---------------------------------------------------------------------------------

GOOD = {
    "dolly15k": {"instruction": "Hi.", "context": "", "response": "Hello.", "category": "open_qa"},
    "alpaca": {"instruction": "Hi.", "input": "", "output": "Hello."},
    "hh_rlhf": {"chosen": "\n\nHuman: Hi.\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi.\n\nAssistant: No."},
    "chat_jsonl": chat(("user", "Hi."), ("assistant", "Hello.")),
    "text": {"text": "Hello."},
}
REQUIRED = {"dolly15k": "response", "alpaca": "output", "hh_rlhf": "chosen", "chat_jsonl": "messages", "text": "text"}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_a_missing_required_field_names_source_line_and_field(tmp_path: Path, name: str) -> None:
    bad = {key: value for key, value in GOOD[name].items() if key != REQUIRED[name]}
    # The blank line after the first record must not shift the line number of the bad one.
    path = write_jsonl(tmp_path / f"{name}.jsonl", [GOOD[name], bad], blank_after_first=True)
    with pytest.raises(DatasetFormatError) as error:
        LOADERS[name](path)
    assert str(error.value) == f"{path}, line 3: missing field {REQUIRED[name]!r}"
    assert (error.value.source, error.value.number) == (path, 3)


@pytest.mark.parametrize(("value", "reason"), [(5, "field 'response' must be a string, got int"),
                                               ("   ", "field 'response' is empty")])  # fmt: skip
def test_a_wrong_or_empty_field_is_invalid(tmp_path: Path, value: object, reason: str) -> None:
    path = write_jsonl(tmp_path / "dolly.jsonl", [GOOD["dolly15k"], {**GOOD["dolly15k"], "response": value}])
    with pytest.raises(DatasetFormatError, match=f"dolly.jsonl, line 2: {reason}"):
        load_dolly15k(path)


def test_records_of_a_json_array_and_rows_of_parquet_are_numbered(tmp_path: Path) -> None:
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps([GOOD["alpaca"], {"instruction": "Hi.", "input": ""}], indent=4))
    with pytest.raises(DatasetFormatError, match=r"alpaca\.json, record 2: missing field 'output'"):
        load_alpaca(array)
    parquet = tmp_path / "dolly.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD["dolly15k"], {**GOOD["dolly15k"], "response": None}]), parquet)
    with pytest.raises(DatasetFormatError, match=r"dolly\.parquet, row 2: missing field 'response'"):
        load_dolly15k(parquet)


def test_broken_json_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "dolly.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write(json.dumps(GOOD["dolly15k"]) + "\n\n" + '{"instruction": "Hi.", "response": \n')
    with pytest.raises(DatasetFormatError, match=r"dolly\.jsonl\.gz, line 3: invalid JSON"):
        load_dolly15k(path)


def test_a_file_that_is_one_json_object_is_not_taken_for_records(tmp_path: Path) -> None:
    wrapped = tmp_path / "alpaca.json"
    wrapped.write_text(json.dumps({"data": [GOOD["alpaca"]]}, indent=2))
    with pytest.raises(DatasetFormatError, match=r"alpaca\.json, line 1: the file is a single JSON object \(keys "
                       r"'data'\), not records \(missing field 'instruction'\); expected a JSON list of records or "
                       r"JSON Lines"):
        load_alpaca(wrapped)
    one_record = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi."}])
    with pytest.raises(DatasetFormatError, match=r"alpaca\.jsonl, line 1: missing field 'output'$"):
        load_alpaca(one_record)


def cut_gzip(path: Path) -> bytes:
    """The first half of `path` gzipped, as an interrupted copy leaves a .gz file."""
    data = gzip.compress(path.read_bytes())
    return data[: len(data) // 2]


@pytest.mark.parametrize("name", sorted(LOADERS))
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda: b"not gzip at all\n", r", line 1: not gzip data; expected a gzip-compressed file \(\.gz\)$"),
        (lambda: cut_gzip(DATA / "dolly_sample.jsonl"), r", line \d+: the gzip data ends early or is damaged"),
    ],
    ids=["not gzip", "cut short"],
)
def test_a_damaged_gz_file_names_the_file_and_what_was_expected(
    tmp_path: Path, name: str, damage: Callable[[], bytes], reason: str
) -> None:
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(damage())
    with pytest.raises(FileFormatError, match=re.escape(str(path)) + reason):
        LOADERS[name](path)


def test_skip_invalid_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [GOOD["dolly15k"], {"instruction": "No reply."}, GOOD["dolly15k"], {"response": "No prompt."}]
    path = write_jsonl(tmp_path / "dolly.jsonl", rows)
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        conversations = load_dolly15k(path, skip_invalid=True, stats=stats)
    assert [c.messages[0].message_id for c in conversations] == ["dolly15k:1:1", "dolly15k:3:1"]
    assert stats == {"records": 4, "skipped_invalid": 2, "kept": 2}
    assert f"skipped 2 invalid record(s) in {path}" in caplog.text


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_a_missing_file_names_the_path_and_the_config_key(tmp_path: Path, name: str) -> None:
    path = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"{path} \(set by datasets\[0\]\.{name}\.source\)"):
        LOADERS[name](path, config_key=f"datasets[0].{name}.source")


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
    with pytest.raises(DatasetFormatError, match=r"^tatsu-lab/alpaca, row 2: missing field 'output'"):
        load_alpaca("tatsu-lab/alpaca", split="train[:10]", cache_dir="hub-cache")
    assert calls == [("tatsu-lab/alpaca", {"split": "train[:10]", "cache_dir": "hub-cache"})]
    for local in ("local/alpaca", "elsewhere/alpaca.json"):
        with pytest.raises(FileNotFoundError, match=local):
            load_alpaca(local)
    assert len(calls) == 1


def test_a_saved_dataset_dict_folder_is_read_by_split(tmp_path: Path) -> None:
    splits = {"train": [GOOD["chat_jsonl"]], "validation": [chat(("user", "Yes?"), ("assistant", "No."))] * 2}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp_path / "ds")
    validation = load_chat_jsonl(tmp_path / "ds", split="validation")
    assert [texts(c) for c in validation] == [[("prompter", "Yes?"), ("assistant", "No.")]] * 2
    assert len(load_chat_jsonl(tmp_path / "ds")) == 1
    with pytest.raises(ValueError, match="has no split 'test'; its splits are train, validation"):
        load_chat_jsonl(tmp_path / "ds", split="test")


def test_an_unsupported_file_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dolly.csv"
    shutil.copy(DATA / "dolly_sample.jsonl", path)
    with pytest.raises(ValueError, match="unsupported file type"):
        load_dolly15k(path)


def test_loaders_cover_every_format() -> None:
    assert set(LOADERS) == {"oasst1", "dolly15k", "alpaca", "hh_rlhf", "chat_jsonl", "text"}
