"""`hh_rlhf`: Anthropic hh-rlhf, the `chosen` dialogue of each row parsed into turns; for the preference stages,
each row's chosen and rejected last replies to their shared conversation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from model_training.data.records import Comparison, Conversation, InvalidRecord
from model_training.data.sources.common import (
    ComparisonSplits,
    DatasetConfig,
    LoadContext,
    Splits,
    Turn,
    comparison,
    conversation,
    required,
)
from model_training.data.sources.rows import load_rows

# A turn marker: only at the start or after a blank line, so that a "Human:" quoted inside a turn does not split it.
_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_ROLES = {"Human": "prompter", "Assistant": "assistant"}


@dataclass
class HhRlhfConfig(DatasetConfig):
    """Anthropic hh-rlhf rows: the `chosen` dialogue ("\n\nHuman: ...\n\nAssistant: ...") parsed into turns."""

    input_file_path: str = "Anthropic/hh-rlhf"
    """The hub id, a `datasets` folder saved from it, or its rows as a .jsonl(.gz)/.parquet file."""


def load(path: str | Path, options: HhRlhfConfig, context: LoadContext) -> Splits:
    """Rows with `chosen` (used) and `rejected` (ignored). `chosen` is one string of turns, "\\n\\nHuman: ...\\n\\n
    Assistant: ...". A turn starts at "Human:" or "Assistant:" placed at the start of the string or after a blank
    line ("\\n\\n"); a marker anywhere else is part of the text. Markers are removed and each turn's text is
    stripped of surrounding whitespace. The turns must alternate, start with Human, end with Assistant and none
    may be empty; otherwise the row is invalid. Split by record."""
    return load_rows(path, options, context, convert_row)


def compare(path: str | Path, options: HhRlhfConfig, context: LoadContext) -> ComparisonSplits:
    """Each row as a comparison: the turns before the last of `chosen` (parsed as `load` parses it) as the prefix,
    and the last Assistant turns of `chosen` and of `rejected` as the replies, chosen first. Both dialogues must
    share every turn before their last, which must be an Assistant turn in each. Split by record, as `load`."""
    return load_rows(path, options, context, _comparison)


def convert_row(row: dict, index: int) -> Conversation:
    """One row as its conversation (`load`'s conversion)."""
    return conversation("hh_rlhf", index, _turns(required(row, "chosen"), "chosen"))


def _comparison(row: dict, index: int) -> Comparison:
    chosen, rejected = (_turns(required(row, name), name) for name in ("chosen", "rejected"))
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1].role != "assistant":
            raise InvalidRecord(f"field {name!r} ends with a Human turn; expected an Assistant reply last")
    if [(t.role, t.text) for t in chosen[:-1]] != [(t.role, t.text) for t in rejected[:-1]]:
        raise InvalidRecord("fields 'chosen' and 'rejected' differ before their last Assistant turn; expected two "
                            "replies to the same conversation")
    replies = [Turn("assistant", chosen[-1].text, "field 'chosen'"), Turn("assistant", rejected[-1].text,
                                                                            "field 'rejected'")]
    return comparison("hh_rlhf", index, chosen[:-1], replies)


def _turns(dialogue: str, field: str) -> list[Turn]:
    # split() with a capturing group gives [text before the first marker, marker, text, marker, text, ...].
    parts = _MARKER.split(dialogue)
    if len(parts) == 1:
        raise InvalidRecord(f"field {field!r} has no 'Human:' or 'Assistant:' turn marker")
    if parts[0].strip():
        raise InvalidRecord(f"field {field!r} has text before its first turn marker")
    of = "" if field == "chosen" else f" of {field!r}"
    return [
        Turn(_ROLES[marker], text.strip(), f"turn {number} ({marker}){of}")
        for number, (marker, text) in enumerate(zip(parts[1::2], parts[2::2]), start=1)
    ]
