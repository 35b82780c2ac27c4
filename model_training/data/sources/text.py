"""`text`: plain pretraining text, fully supervised."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from model_training.data.records import InvalidRecord, TextDocument
from model_training.data.sources.common import DatasetConfig, LoadContext, Splits, optional, split_by_record
from model_training.data.sources.rows import load_rows, read_rows


@dataclass
class TextConfig(DatasetConfig):
    """Plain pretraining text (.txt, documents separated by blank lines, or jsonl with `text`): fully
    supervised, each document cut into pieces of the global `max_length`."""


def load(path: str | Path, options: TextConfig, context: LoadContext) -> Splits:
    """A `.txt` file holds documents separated by blank (or whitespace-only) lines; a document is its lines joined
    with "\\n". Any other source has a `text` field per record, one document each. Blank documents are skipped, and
    not counted as invalid. Split by document."""
    if Path(str(path)).suffix != ".txt":
        return load_rows(path, options, context, convert_row)
    table = read_rows(path, context.config_key)
    return split_by_record(documents(row["text"] for row in table.rows), options)


def convert_row(row: dict, index: int) -> TextDocument | None:
    """One row as its document (`load`'s conversion); None for a blank one."""
    text = optional(row, "text")
    if text is None:
        raise InvalidRecord("missing field 'text'")
    return TextDocument(text) if text.strip() else None


def documents(lines: Iterable[str]) -> list[TextDocument]:
    """The documents of a text file's lines (without their line breaks): runs of non-blank lines."""
    documents, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            documents.append(TextDocument("\n".join(current)))
            current = []
    if current:
        documents.append(TextDocument("\n".join(current)))
    return documents
