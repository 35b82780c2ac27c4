"""`chat_jsonl`: OpenAI-style chat records, `{"messages": [{"role", "content"}, ...], "lang"?}`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model_training.data.records import Conversation, InvalidRecord
from model_training.data.selection import parse_languages
from model_training.data.sources.common import (
    DatasetConfig,
    LoadContext,
    Splits,
    Turn,
    conversation,
    optional,
)
from model_training.data.sources.rows import load_rows

_ROLES = {"user": "prompter", "assistant": "assistant"}


@dataclass
class ChatJsonlConfig(DatasetConfig):
    """OpenAI-style chat lines: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}], "lang"?}."""

    lang: str | None = None
    """Comma-separated languages to keep, for records that carry `lang`; null: keep all."""


def load(path: str | Path, options: ChatJsonlConfig, context: LoadContext) -> Splits:
    """Records with `messages`, a list of `{"role": "system" | "user" | "assistant", "content": "..."}`, and an
    optional `lang`.

    A leading system message becomes `Conversation.system` (a blank one is dropped); a system message anywhere
    else is invalid. User messages become prompter turns. The turns must alternate starting with user; a
    trailing user turn is dropped (it has no reply to learn), after which at least one assistant reply must
    remain. Empty user or assistant content is invalid. Other keys of a message are ignored. Split by record;
    then, with the `lang` option, the records whose `lang` is another are dropped (and counted) on each side.
    """
    train, val = load_rows(path, options, context, convert_row)
    keep = language_filter(options)
    if keep is None:
        return train, val
    return _kept(train, keep, context), _kept(val, keep, context)


def language_filter(options: ChatJsonlConfig) -> Callable[[Conversation], bool] | None:
    """Whether a record is kept by the `lang` option: it is in one of its languages or has none; None without it."""
    if not options.lang:
        return None
    langs = parse_languages(options.lang)
    return lambda record: record.lang is None or record.lang in langs


def _kept(
    records: list[Conversation], keep: Callable[[Conversation], bool], context: LoadContext
) -> list[Conversation]:
    """The records `keep` keeps; the others are counted in the report."""
    kept = [record for record in records if keep(record)]
    context.report.add_other_language(len(records) - len(kept))
    return kept


def convert_row(row: dict, index: int) -> Conversation:
    """One row as its conversation (`load`'s conversion)."""
    messages = row.get("messages")
    if messages is None:
        raise InvalidRecord("missing field 'messages'")
    if not isinstance(messages, list):
        raise InvalidRecord(f"field 'messages' must be a list, got {type(messages).__name__}")
    system, turns = message_turns(messages)
    if turns and turns[-1].role == "prompter":
        turns.pop()
    return conversation("chat", index, turns, system=system, lang=optional(row, "lang") or None)


def message_turns(messages: list) -> tuple[str | None, list[Turn]]:
    """(system text, turns) of a `messages` list (see `load`), unchecked for order."""
    system = None
    turns: list[Turn] = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise InvalidRecord(f"message {number} must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        for name, value in (("role", role), ("content", content)):
            if value is None:
                raise InvalidRecord(f"message {number} lacks field {name!r}")
            if not isinstance(value, str):
                raise InvalidRecord(f"message {number} has a {name!r} that is not a string")
        if role == "system" and number == 1:
            system = content if content.strip() else None
        elif role == "system":
            raise InvalidRecord(f"message {number} is a system message; only the first may be one")
        elif role in _ROLES:
            turns.append(Turn(_ROLES[role], content, f"message {number} ({role})"))
        else:
            raise InvalidRecord(f"message {number} has unknown role {role!r}")
    return system, turns
