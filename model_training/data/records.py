"""What every data source yields (conversations, plain text), and the one error for an input file that does not hold
what its format promises, with the readers of text and JSON Lines that raise it.

Its own module, outside model_training/data/sources/, because the OASST reader (model_training/data/oasst.py) needs
it too and the sources package imports that reader.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("prompter", "assistant")
"""The roles of a conversation's turns, in the order they alternate."""


@dataclass(frozen=True)
class Message:
    """One message of a thread; `labels` maps a label name (e.g. "quality") to its averaged value."""

    role: str
    text: str
    message_id: str
    lang: str | None = None
    rank: int | None = None
    labels: dict[str, float] = field(default_factory=dict)
    synthetic: bool = False
    deleted: bool = False


Thread = list[Message]


@dataclass(frozen=True)
class Conversation:
    """One training conversation: prompter/assistant messages alternating, starting with a prompter and ending with
    an assistant; `lang` is the language its source gives it (the OASST prompt's, a chat record's `lang`), if any."""

    messages: tuple[Message, ...]
    system: str | None = None
    lang: str | None = None


@dataclass(frozen=True)
class TextDocument:
    """Plain pretraining text: fully supervised, cut into pieces of `max_length` tokens when formatted."""

    text: str


Record = Conversation | TextDocument


@dataclass(frozen=True)
class Comparison:
    """Ranked replies to one conversation, for the preference stages (reward model, DPO): `prefix` alternates
    prompter/assistant, starts and ends with a prompter; `replies` are the assistant's answers to it, best first,
    at least two."""

    prefix: tuple[Message, ...]
    replies: tuple[str, ...]
    system: str | None = None
    lang: str | None = None


class FileFormatError(ValueError):
    """An input file does not hold what its format promises; the message names the file, the 1-based line (or
    record, row, instance: `unit`) and what was wrong. `line` is None for a fault of the file as a whole."""

    def __init__(self, path: str | Path, line: int | None, reason: str, unit: str = "line") -> None:
        super().__init__(f"{path}: {reason}" if line is None else f"{path}, {unit} {line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason
        self.unit = unit

    def __reduce__(self) -> tuple:
        # Raised in a data preparation process and raised again in the rank that waits for it (data/build.py).
        return type(self), (self.path, self.line, self.reason, self.unit)


class InvalidRecord(Exception):
    """Raised while reading one record; its reader turns it into a FileFormatError with the record's number, or
    skips the record under `skip_invalid`."""


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, gunzipped when the name ends in .gz (see `TextLines`)."""
    return iter(TextLines(path))


class TextLines:
    """The lines of a UTF-8 text file, gunzipped when the name ends in .gz, with universal newlines. A file that is
    not what its name says raises FileFormatError at the line where reading failed: the first for data that is not
    gzip, the one after the last whole line for a gzip stream cut short. `fraction()` tells, while the lines are
    read, how far into the file (compressed, for .gz) reading has come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw: Any = None

    def __iter__(self) -> Iterator[str]:
        path = self.path
        opener = gzip.open if path.suffix == ".gz" else open
        read = 0
        try:
            with opener(path, "rt", encoding="utf-8") as lines:
                # The file under the text layer (under the decompressor for .gz): its position is the bytes read.
                self._raw = getattr(lines.buffer, "fileobj", lines.buffer)
                for line in lines:
                    yield line
                    read += 1
        except gzip.BadGzipFile:
            raise FileFormatError(path, read + 1, "not gzip data; expected a gzip-compressed file (.gz)") from None
        except (EOFError, zlib.error):
            reason = "the gzip data ends early or is damaged (an interrupted copy?); expected a whole .gz file"
            raise FileFormatError(path, read + 1, reason) from None
        except UnicodeDecodeError as error:
            raise FileFormatError(path, read + 1, f"not UTF-8 text ({error.reason}); expected UTF-8") from None
        finally:
            self._raw = None

    def fraction(self) -> float:
        """The share of the file's bytes read so far (1.0 once the lines are done)."""
        if self._raw is None or self._raw.closed:
            return 1.0
        return min(1.0, self._raw.tell() / max(1, os.path.getsize(self.path)))


def json_line(line: str) -> object:
    """One JSON Lines record; a decoder error's column then counts from the start of that line."""
    return json.loads(line.rstrip("\n"))


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_encodable(value: object, line: str | None = None) -> None:
    """InvalidRecord naming the field of the JSON record `value` whose text holds a lone surrogate ("\\ud800" written
    in the JSON, half of a UTF-16 pair): JSON reads it, but no tokenizer encodes it. Only an escape writes one in
    UTF-8 text, so a record parsed from a `line` without one is not looked into."""
    if line is None or "\\ud" in line.lower():
        found = _lone_surrogate(value, "")
        if found is not None:
            raise InvalidRecord(found)


def _lone_surrogate(value: object, where: str) -> str | None:
    if isinstance(value, str):
        match = _LONE_SURROGATE.search(value)
        if match is None:
            return None
        return (f"field '{where}' holds a lone surrogate (\\u{ord(match.group()):04x}) at character "
                f"{match.start() + 1}; expected text that UTF-8 can encode (the character itself, or both halves of "
                "its \\u pair)")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key)
        if found is not None:
            return found
    return None


def invalid_json(error: json.JSONDecodeError) -> str:
    """What is wrong with a record that is not JSON, at the decoder's column. Messages that end in "at" ("Unterminated
    string starting at") name the column where the broken token starts."""
    return f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"
