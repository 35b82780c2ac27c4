"""Streamed inputs: cut into chunks anywhere, they give the records, numbers and errors of the source's whole `load`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers import REPO

from model_training.data.records import FileFormatError
from model_training.data.sources import SOURCES
from model_training.data.sources import stream as stream_module
from model_training.data.sources.common import FilterReport, LoadContext, split_by_record
from model_training.data.sources.stream import chunk_records, line_chunks, streams

DATA = REPO / "data"


def loaded(name: str, path: Path, **options) -> tuple[list, list]:
    source = SOURCES[name]
    return source.load(path, source.options(**options), LoadContext(FilterReport(name)))


def streamed(name: str, path: Path, **options) -> tuple[list, list]:
    """The records of every chunk, split and filtered as the preparation does with them (prepare.choose_samples)."""
    source = SOURCES[name]
    opts = source.options(**options)
    assert streams(source, path)
    records, refused = [], []
    for chunk in line_chunks(path, source.documents):
        part = chunk_records(chunk, source, path, opts, lambda: loaded(name, path, **options))
        records += part.records
        refused += part.other_language
    train, val = split_by_record(range(len(records)), opts)
    return [records[i] for i in train if not refused[i]], [records[i] for i in val if not refused[i]]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few lines, so that the bundled samples are cut in many places."""
    monkeypatch.setattr(stream_module, "CHUNK_CHARS", 300)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_chunks_cover_every_line_once_and_documents_stay_whole() -> None:
    lines = (DATA / "text_sample.txt").read_text().splitlines(keepends=True)
    chunks = list(line_chunks(DATA / "text_sample.txt", documents=True))
    assert len(chunks) > 5 and [line for c in chunks for line in c.lines] == lines
    assert all(not c.lines[-1].strip() for c in chunks[:-1])  # each cut after a blank line
    assert [c.first_line for c in chunks] == [1 + sum(len(c.lines) for c in chunks[:i]) for i in range(len(chunks))]


@pytest.mark.parametrize("name, file, options", [
    ("chat_jsonl", "chat_sample.jsonl", {"val_split": 0.3}),
    ("chat_jsonl", "chat_sample.jsonl", {"lang": "en"}),
    ("dolly15k", "dolly_sample.jsonl", {}),
    ("hh_rlhf", "hh_rlhf_sample.jsonl.gz", {"val_split": 0.2}),
    ("text", "text_sample.txt", {"val_split": 0.2}),
])
def test_streamed_records_are_the_loads(name: str, file: str, options: dict) -> None:
    train, val = streamed(name, DATA / file, **options)
    assert (train, val) == loaded(name, DATA / file, **options) and train and val


def test_text_and_alpaca_rows_as_json_lines(tmp_path: Path) -> None:
    documents = (DATA / "text_sample.txt").read_text().split("\n\n")
    text = write_jsonl(tmp_path / "text.jsonl", [json.dumps({"text": d}) for d in documents + ["   "]])
    assert streamed("text", text) == loaded("text", text)
    rows = json.loads((DATA / "alpaca_sample.json").read_text())
    alpaca = tmp_path / "alpaca.jsonl.gz"
    with gzip.open(alpaca, "wt") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    assert streamed("alpaca", alpaca, val_split=0.1) == loaded("alpaca", alpaca, val_split=0.1)


CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]})


@pytest.mark.parametrize("bad, reason", [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"messages": [{"role": "assistant", "content": "Hi."}]}), "out of order"),
    (json.dumps({"messages": "Hi."}), "must be a list"),
    ('{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "He\\udc00llo."}]}',
     r"field 'messages[1].content' holds a lone surrogate (\udc00) at character 3; expected text that UTF-8 can"),
])
def test_a_bad_line_is_named_as_the_load_names_it(tmp_path: Path, bad: str, reason: str) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 30 + [""] + [bad] + [CHAT] * 5)
    with pytest.raises(FileFormatError) as from_load:
        loaded("chat_jsonl", path)
    with pytest.raises(FileFormatError) as from_stream:
        streamed("chat_jsonl", path)
    assert str(from_stream.value) == str(from_load.value) and "line 32" in str(from_stream.value)
    assert reason in str(from_stream.value)


def test_skipped_records_are_the_loads(tmp_path: Path) -> None:
    bad = json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]})
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, bad] * 20)
    source = SOURCES["chat_jsonl"]
    opts = source.options(skip_invalid=True)
    chunks = [chunk_records(c, source, path, opts, lambda: None) for c in line_chunks(path, False)]
    assert sum(c.skipped for c in chunks) == 20 and sum(len(c.records) for c in chunks) == 20


def test_a_file_that_is_one_json_object_is_explained_by_the_whole_load(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"data": [json.loads(CHAT)]}, indent=2))
    with pytest.raises(FileFormatError) as from_load:
        loaded("chat_jsonl", path)
    with pytest.raises(FileFormatError) as from_stream:
        streamed("chat_jsonl", path)
    assert str(from_stream.value) == str(from_load.value)


def test_a_surrogate_pair_and_a_nul_character_are_text_that_trains(tmp_path: Path) -> None:
    """What the lone surrogate's check must let through: an emoji written as its \\u pair, and NUL, which the
    tokenizer encodes."""
    pair = ('{"messages": [{"role": "user", "content": "Hi \\ud83d\\ude00"}, '
            '{"role": "assistant", "content": "A\\u0000B"}]}')
    path = write_jsonl(tmp_path / "chat.jsonl", [pair])
    train, _ = streamed("chat_jsonl", path)
    assert [m.text for m in train[0].messages] == ["Hi \U0001f600", "A\x00B"]
    assert loaded("chat_jsonl", path)[0] == train
