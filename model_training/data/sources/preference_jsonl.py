"""`preference_jsonl`: preference pairs in the common layout, `{"prompt" or "messages", "chosen", "rejected"}`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_training.data.records import Comparison, InvalidRecord
from model_training.data.sources.chat_jsonl import message_turns
from model_training.data.sources.common import (
    ComparisonSplits,
    DatasetConfig,
    LoadContext,
    Turn,
    comparison,
    required,
)
from model_training.data.sources.rows import load_rows


@dataclass
class PreferenceJsonlConfig(DatasetConfig):
    """Preference records: {"prompt": "..."} or {"messages": [{"role", "content"}, ...]}, with "chosen" and
    "rejected" replies (strings), as TRL and most preference datasets write them."""

    input_file_path: str = "preference_sample.jsonl"
    """The file (.jsonl, .jsonl.gz, .json, .parquet), a `datasets` folder, or a hub id."""


def compare(path: str | Path, options: PreferenceJsonlConfig, context: LoadContext) -> ComparisonSplits:
    """Each record as a comparison of its `chosen` (first) and `rejected` replies to its conversation: `prompt`, one
    user turn, or `messages` as `chat_jsonl` reads them (a leading system message, then turns alternating from the
    user and ending with one). Exactly one of `prompt` and `messages`. Split by record."""
    return load_rows(path, options, context, _comparison)


def prompt_turns(row: dict) -> tuple[str | None, list[Turn]]:
    """(system text, turns) of a row's conversation: `prompt`, one user turn, or `messages` as `chat_jsonl` reads them,
    exactly one of the two; unchecked for order (PPO's prompt files read the same fields)."""
    # A field absent from a row reads as null: the library gives every row the columns of the whole file.
    if (row.get("prompt") is None) == (row.get("messages") is None):
        raise InvalidRecord("needs exactly one of the fields 'prompt' and 'messages'")
    if row.get("prompt") is not None:
        return None, [Turn("prompter", required(row, "prompt"), "field 'prompt'")]
    messages = row["messages"]
    if not isinstance(messages, list):
        raise InvalidRecord(f"field 'messages' must be a list, got {type(messages).__name__}")
    return message_turns(messages)


def _comparison(row: dict, index: int) -> Comparison:
    system, prefix = prompt_turns(row)
    replies = [Turn("assistant", required(row, name), f"field {name!r}") for name in ("chosen", "rejected")]
    return comparison("preference", index, prefix, replies, system)
