"""Large inputs read as a stream of chunks, with the records each source's `load` would give.

Data preparation (model_training/data/build.py) streams a JSON Lines file (`.jsonl`, `.jsonl.gz`) of a source whose
records are rows (`Source.rows`), and a `.txt` file of the `text` source (`Source.documents`): memory is bounded by
a chunk, not by the file. Every other input goes through the source's `load`, whole.

The file is cut into chunks of about `CHUNK_CHARS` characters at line ends (a `.txt` of documents at blank lines,
so that no document spans two chunks). Cutting is cheap (the lines are only read); turning a chunk's lines into
records (parsing JSON, the source's checks) is left to whoever takes the chunk, so that each process of a job
parses only its own share. A chunk knows the line and row numbers it starts at, and its records are numbered as
`load` numbers them: errors name the file's line, exactly as `load` does, and the split by record
(`split_by_record`) is decided once every chunk's count is known (prepare.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_training.data.records import (
    FileFormatError,
    InvalidRecord,
    Record,
    TextLines,
    check_encodable,
    invalid_json,
    json_line,
)
from model_training.data.sources.common import DatasetConfig, Source
from model_training.data.sources.rows import suffix

CHUNK_CHARS = 1 << 20
"""About a megabyte of text per chunk: a second or so of tokenizing, small enough to balance the work and bound the
memory of a chunk in flight."""
_JSON_LINES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class LineChunk:
    """Consecutive lines of the file."""

    number: int
    """0-based, in file order."""
    first_line: int
    """The file's 1-based line number of `lines[0]`."""
    rows_before: int
    """Non-blank lines before the chunk: JSON Lines rows are numbered among the non-blank lines, as `load` does."""
    lines: list[str]
    fraction: float
    """The share of the file read when the chunk was cut (for a progress estimate)."""


@dataclass(frozen=True)
class ChunkRecords:
    """A chunk's records in order, which of them the source's filter refused, and how many invalid rows it skipped."""

    records: list[Record]
    other_language: list[bool]
    skipped: int


def streams(source: Source, path: str | Path) -> bool:
    """Whether data preparation streams `path` for `source` rather than calling its `load`."""
    name = suffix(Path(path)) if Path(path).is_file() else ""
    return (source.rows is not None and name in _JSON_LINES) or (source.documents and name == ".txt")


def line_chunks(path: Path, documents: bool) -> Iterator[LineChunk]:
    """The file's lines, cut into chunks of at least `CHUNK_CHARS` characters at a line end (`documents`: after a
    blank line)."""
    lines = TextLines(path)
    chunk: list[str] = []
    size, number, first_line, rows_before, rows = 0, 0, 1, 0, 0
    for line in lines:
        chunk.append(line)
        size += len(line)
        blank = not line.strip()
        rows += not blank
        if size >= CHUNK_CHARS and (blank or not documents):
            yield LineChunk(number, first_line, rows_before, chunk, lines.fraction())
            number, first_line, rows_before = number + 1, first_line + len(chunk), rows_before + rows
            chunk, size, rows = [], 0, 0
    if chunk or number == 0:  # an empty file is one empty chunk: every dataset has at least one
        yield LineChunk(number, first_line, rows_before, chunk, 1.0)


def chunk_records(
    chunk: LineChunk, source: Source, path: Path, options: DatasetConfig, whole_file_error: Callable[[], Any]
) -> ChunkRecords:
    """The records of a chunk as `source.load` gives them, before its split. `whole_file_error()` is called when the
    file's first row is not JSON: the file may be one JSON object, which `load` reads whole and explains."""
    if source.documents and suffix(path) == ".txt":
        from model_training.data.sources.text import documents  # the text source's rule for its documents

        records: list[Record] = list(documents(line.rstrip("\n") for line in chunk.lines))
        return ChunkRecords(records, [False] * len(records), 0)
    keep = source.keeps(options) if source.keeps is not None else None
    records, skipped, row = [], 0, chunk.rows_before
    for line_number, line in enumerate(chunk.lines, start=chunk.first_line):
        if not line.strip():
            continue
        row += 1
        try:
            value = json_line(line)
        except json.JSONDecodeError as bad:
            if row == 1:
                whole_file_error()
            raise FileFormatError(path, line_number, invalid_json(bad)) from None
        if not isinstance(value, dict):
            raise FileFormatError(path, line_number, f"expected a JSON object, got {type(value).__name__}")
        try:
            check_encodable(value, line)
            record = source.rows(value, row)
        except InvalidRecord as error:
            if not options.skip_invalid:
                raise FileFormatError(path, line_number, str(error)) from None
            skipped += 1
            continue
        if record is not None:
            records.append(record)
    refused = [keep is not None and not keep(record) for record in records]
    return ChunkRecords(records, refused, skipped)
