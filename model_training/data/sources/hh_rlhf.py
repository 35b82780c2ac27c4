"""`hh_rlhf`: Anthropic hh-rlhf, the `chosen` dialogue of each row parsed into turns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from model_training.data.records import Conversation, InvalidRecord
from model_training.data.sources.common import DatasetConfig, LoadContext, Splits, Turn, conversation, required
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
    return load_rows(path, options, context, _conversation)


def _conversation(row: dict, index: int) -> Conversation:
    return conversation("hh_rlhf", index, _turns(required(row, "chosen")))


def _turns(dialogue: str) -> list[Turn]:
    # split() with a capturing group gives [text before the first marker, marker, text, marker, text, ...].
    parts = _MARKER.split(dialogue)
    if len(parts) == 1:
        raise InvalidRecord("field 'chosen' has no 'Human:' or 'Assistant:' turn marker")
    if parts[0].strip():
        raise InvalidRecord("field 'chosen' has text before its first turn marker")
    return [
        Turn(_ROLES[marker], text.strip(), f"turn {number} ({marker})")
        for number, (marker, text) in enumerate(zip(parts[1::2], parts[2::2]), start=1)
    ]
