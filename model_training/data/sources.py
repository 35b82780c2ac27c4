"""Loaders for the other data formats the Falcon chat models were tuned on, besides OASST exports.

Every loader takes a `source`, which is one of
- a local file: `.jsonl`, `.jsonl.gz`, `.json` (a JSON array, or JSON Lines), `.json.gz`, `.parquet`, or `.txt`
  (for the `text` loader; other loaders would find only a `text` field in it);
- a local folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: `split` picks one);
- a Hugging Face hub id such as "databricks/databricks-dolly-15k", read with `datasets.load_dataset(source,
  split=split)`; this needs network, or the dataset in the hub cache. A string is taken for a hub id only
  when no such local path exists, it has the form "owner/name" without a known file suffix, and "owner" is
  not a local file or folder; anything else that does not exist is a FileNotFoundError. A hub id that can
  be neither downloaded nor found in the cache (offline) is a ConnectionError that names the config key.

All of them are read through the `datasets` library. Local files are converted into a temporary cache that
is deleted after the load (unless `cache_dir` is given), so nothing lands in the repository or in the
user's home; hub downloads use `cache_dir` or the library's usual cache, since they are worth keeping.

Records come back in source order, with no split and no shuffle: the caller splits (the OASST rows come as one
list per message tree, so that a tree stays on one side). A malformed record raises
DatasetFormatError naming the source, the record (1-based line of a JSON Lines or text file, record of a JSON
array, row of a parquet file, saved folder or hub dataset) and what is wrong. With `skip_invalid` such
records are skipped instead, counted, and reported in one warning. A file that the library cannot parse
at all (broken JSON, a .gz file that is not gzip or is cut short) is always an error: there is no record
to skip; the library reads a file that is one JSON object as one record, and the error about that record
says that a JSON list or JSON Lines was expected. Errors about a file's content are FileFormatErrors
(DatasetFormatError is one).

`stats`, when given, is filled with `records` (rows read; lines for a `.txt` file), `skipped_invalid` and
`kept` (the records returned), and for `oasst1` with `other_language` (threads left out for their language).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from model_training.config import is_hub_id
from model_training.data.oasst import (
    ROLES,
    FileFormatError,
    Message,
    OasstFormatError,
    invalid_json,
    json_line,
    text_lines,
    trees_from_rows,
)

logger = logging.getLogger(__name__)

# Suffix -> the `datasets` packaged builder that reads it (compressed files are opened by the library).
_BUILDERS = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
# A turn marker of an hh-rlhf dialogue: only at the start or after a blank line, so that a "Human:" quoted
# inside a turn does not split it.
_HH_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "prompter", "Assistant": "assistant"}
_CHAT_ROLES = {"user": "prompter", "assistant": "assistant"}

T = TypeVar("T")


@dataclass(frozen=True)
class Conversation:
    """One training conversation: prompter/assistant messages alternating, starting with a prompter and
    ending with an assistant. `group` keeps related conversations on one side of a train/validation split
    (the message tree id for OASST; None elsewhere)."""

    messages: tuple[Message, ...]
    system: str | None = None
    lang: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class TextDocument:
    """Plain pretraining text: fully supervised, chunked by the caller."""

    text: str


class DatasetFormatError(FileFormatError):
    """A record of a dataset is malformed; the message names the source, the 1-based record and the fault,
    e.g. "data/dolly.jsonl, line 7: missing field 'response'"."""

    def __init__(self, source: str | Path, number: int, reason: str, unit: str = "line") -> None:
        super().__init__(source, number, reason, unit)
        self.source = source
        self.number = number


class _InvalidRecord(Exception):
    """Raised while converting one record; turned into DatasetFormatError (or a skip) with its number."""


@dataclass(frozen=True)
class _Table:
    """The rows of a source as the `datasets` library read them, and how to name one in a message."""

    source: str | Path
    rows: Any  # a datasets.Dataset (the library is imported lazily; see _read)
    unit: str  # "line", "record" (of a JSON array) or "row"
    json_lines: Path | None = None  # a JSON Lines file, whose blank lines have no row

    def error(self, index: int, reason: str) -> DatasetFormatError:
        """The error for the 1-based row `index`."""
        number = index
        if self.json_lines is not None:
            # Found again only for the error: row i is the i-th non-blank line.
            nonblank = (n for n, line in enumerate(text_lines(self.json_lines), start=1) if line.strip())
            number = next(n for i, n in enumerate(nonblank, start=1) if i == index)
            if len(self.rows) == 1 and _one_json_object(self.json_lines):
                keys = ", ".join(repr(k) for k in self.rows.column_names)
                reason = (f"the file is a single JSON object (keys {keys}), not records ({reason}); expected a "
                          "JSON list of records or JSON Lines, one record per line")
        return DatasetFormatError(self.source, number, reason, self.unit)


@dataclass(frozen=True)
class _Turn:
    role: str  # "prompter" | "assistant"
    text: str
    where: str  # the turn in the source's terms, for messages: "turn 2 (Assistant)", "field 'response'"


def load_oasst1_trees(
    source: str | Path,
    *,
    lang: str = "en",
    top_k: int | None = None,
    skip_invalid: bool = False,
    stats: dict[str, int] | None = None,
    config_key: str | None = None,
    split: str = "train+validation",
    cache_dir: str | Path | None = None,
) -> list[list[Conversation]]:
    """The released flat OASST dataset ("OpenAssistant/oasst1"): one message per row, read as message trees.

    Fields: `message_id`, `text`, `role` ("prompter" | "assistant") and `message_tree_id` are required;
    `parent_id`, `lang`, `review_result`, `deleted`, `synthetic`, `rank`, `labels` and `tree_state` are
    read when present (null otherwise); the rest (`user_id`, `emojis`, `detoxify`, ...) is ignored. A parent
    row must come before its children. Trees and threads are filtered exactly as `load_oasst_export` does
    (ready trees, reviewed prompts in `lang`, no deleted or synthetic messages, `top_k`). One list per tree
    that passes the tree filter, in the order the trees first appear in the rows, holding one Conversation per
    thread (`group` = the message tree id, `lang` = the prompt's language; none for a tree without threads):
    the list OpenAssistant splits. A malformed row drops its whole tree under `skip_invalid`.

    `split` may join splits with "+": the OpenAssistant trainer reads the hub dataset's "train+validation".
    """
    table = _read(source, split, cache_dir, config_key)
    counts: dict[str, int] = {}
    try:
        tree_threads = trees_from_rows(table.rows, table.source, lang, top_k, skip_invalid, counts)
    except OasstFormatError as error:
        raise table.error(error.line, error.reason) from None
    if counts["skipped_lines"]:
        logger.warning("skipped %d invalid row(s) in %s", counts["skipped_lines"], table.source)
    trees = [
        [Conversation(messages=tuple(thread), lang=thread[0].lang, group=tree_id) for thread in threads]
        for tree_id, threads in tree_threads
    ]
    if stats is not None:
        stats.update(records=counts["records"], skipped_invalid=counts["skipped_lines"],
                     kept=sum(map(len, trees)), other_language=counts["other_language"])
    return trees


def load_oasst1(source: str | Path, **options: Any) -> list[Conversation]:
    """The conversations of `load_oasst1_trees` (which takes the same options), tree after tree."""
    return [conversation for tree in load_oasst1_trees(source, **options) for conversation in tree]


def load_dolly15k(
    source: str | Path,
    *,
    skip_invalid: bool = False,
    stats: dict[str, int] | None = None,
    config_key: str | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> list[Conversation]:
    """databricks-dolly-15k rows: `instruction`, `context` (may be empty or missing), `response`, `category`.

    One two-message Conversation per row. The prompt is the instruction, followed by a blank line and the
    context when the context is not blank: `instruction + "\\n\\n" + context`. `category` is not used.
    """

    def convert(row: dict, index: int) -> Conversation:
        prompt = _join(_required(row, "instruction"), _string(row, "context"))
        return _conversation("dolly15k", index, _pair(prompt, _required(row, "response"), "response"))

    return _convert(_read(source, split, cache_dir, config_key), convert, skip_invalid, stats)


def load_alpaca(
    source: str | Path,
    *,
    skip_invalid: bool = False,
    stats: dict[str, int] | None = None,
    config_key: str | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> list[Conversation]:
    """Stanford Alpaca records: `instruction`, `input` (may be empty or missing), `output`.

    The release is one JSON array (`alpaca_data.json`); JSON Lines and the other sources work too. One
    two-message Conversation per record; the prompt is `instruction + "\\n\\n" + input` when the input is not
    blank, else the instruction.
    """

    def convert(row: dict, index: int) -> Conversation:
        prompt = _join(_required(row, "instruction"), _string(row, "input"))
        return _conversation("alpaca", index, _pair(prompt, _required(row, "output"), "output"))

    return _convert(_read(source, split, cache_dir, config_key), convert, skip_invalid, stats)


def load_hh_rlhf(
    source: str | Path,
    *,
    skip_invalid: bool = False,
    stats: dict[str, int] | None = None,
    config_key: str | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> list[Conversation]:
    """Anthropic hh-rlhf rows: `chosen` (used) and `rejected` (ignored).

    `chosen` is one string of turns, "\\n\\nHuman: ...\\n\\nAssistant: ...". A turn starts at "Human:" or
    "Assistant:" placed at the start of the string or after a blank line ("\\n\\n"); a marker anywhere else is
    part of the text. Markers are removed and each turn's text is stripped of surrounding whitespace. The turns
    must alternate, start with Human, end with Assistant and none may be empty; otherwise the row is invalid.
    """

    def convert(row: dict, index: int) -> Conversation:
        return _conversation("hh_rlhf", index, _hh_turns(_required(row, "chosen")))

    return _convert(_read(source, split, cache_dir, config_key), convert, skip_invalid, stats)


def load_chat_jsonl(
    source: str | Path,
    *,
    skip_invalid: bool = False,
    stats: dict[str, int] | None = None,
    config_key: str | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> list[Conversation]:
    """OpenAI-style chat records: `messages`, a list of `{"role": "system" | "user" | "assistant", "content":
    "..."}`, and an optional `lang`.

    A leading system message becomes `Conversation.system` (a blank one is dropped); a system message anywhere
    else is invalid. User messages become prompter turns. The turns must alternate starting with user; a
    trailing user turn is dropped (it has no reply to learn), after which at least one assistant reply must
    remain. Empty user or assistant content is invalid. Other keys of a message are ignored.
    """

    def convert(row: dict, index: int) -> Conversation:
        messages = row.get("messages")
        if messages is None:
            raise _InvalidRecord("missing field 'messages'")
        if not isinstance(messages, list):
            raise _InvalidRecord(f"field 'messages' must be a list, got {type(messages).__name__}")
        system, turns = _chat_turns(messages)
        return _conversation("chat", index, turns, system=system, lang=_string(row, "lang") or None)

    return _convert(_read(source, split, cache_dir, config_key), convert, skip_invalid, stats)


def load_text(
    source: str | Path,
    *,
    skip_invalid: bool = False,
    stats: dict[str, int] | None = None,
    config_key: str | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> list[TextDocument]:
    """Plain pretraining text.

    A `.txt` file holds documents separated by blank (or whitespace-only) lines; a document is its lines
    joined with "\\n". Any other source has a `text` field per record, one document each. Blank documents are
    skipped, and not counted as invalid.
    """
    table = _read(source, split, cache_dir, config_key)
    if Path(str(source)).suffix != ".txt":

        def convert(row: dict, index: int) -> TextDocument | None:
            text = _string(row, "text")
            if text is None:
                raise _InvalidRecord("missing field 'text'")
            return TextDocument(text) if text.strip() else None

        return _convert(table, convert, skip_invalid, stats)

    documents, lines = [], []
    for row in table.rows:
        if row["text"].strip():
            lines.append(row["text"])
        elif lines:
            documents.append(TextDocument("\n".join(lines)))
            lines = []
    if lines:
        documents.append(TextDocument("\n".join(lines)))
    if stats is not None:
        stats.update(records=len(table.rows), skipped_invalid=0, kept=len(documents))
    return documents


LOADERS: dict[str, Callable[..., list[Conversation] | list[TextDocument]]] = {
    "oasst1": load_oasst1,
    "dolly15k": load_dolly15k,
    "alpaca": load_alpaca,
    "hh_rlhf": load_hh_rlhf,
    "chat_jsonl": load_chat_jsonl,
    "text": load_text,
}
"""Source format name -> loader."""


def _read(source: str | Path, split: str, cache_dir: str | Path | None, config_key: str | None) -> _Table:
    """The rows of a source (see the module docstring for what a source may be)."""
    # Imported here: `datasets` takes seconds to import and only these loaders need it.
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _joined_splits(loaded, split, path)
        return _Table(source, loaded, "row")
    origin = f" (set by {config_key})" if config_key else ""
    if not path.exists():
        if is_hub_dataset(source):
            return _Table(source, _read_hub(str(source), split, cache_dir, origin), "row")
        raise FileNotFoundError(f"dataset file not found: {path}{origin}")
    builder = _BUILDERS.get(_suffix(path))
    if builder is None:
        raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(_BUILDERS)} or a folder")
    # The library logs its own line about a JSON file it cannot parse; `_explain_json_error` says where.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="sources-cache-") as tmp:
        try:
            # keep_in_memory: the rows must outlive the temporary cache.
            rows = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=str(cache_dir or tmp), keep_in_memory=True
            )
        except Exception:
            if builder == "json":
                _explain_json_error(path, source)
            raise
    if builder == "parquet":
        return _Table(source, rows, "row")
    if builder == "text" or _is_json_array(path):
        return _Table(source, rows, "line" if builder == "text" else "record")
    return _Table(source, rows, "line", json_lines=path)


def _joined_splits(loaded: Any, split: str, path: Path) -> Any:
    """The rows of `split` ("train", or "train+validation" as the hub reads it) of a saved DatasetDict."""
    import datasets

    names = split.split("+")
    missing = [name for name in names if name not in loaded]
    if missing:
        raise ValueError(f"{path} has no split {missing[0]!r}; its splits are {', '.join(loaded)}")
    return datasets.concatenate_datasets([loaded[name] for name in names])


def _suffix(path: Path) -> str:
    suffixes = path.suffixes
    return "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


def _read_hub(source: str, split: str, cache_dir: str | Path | None, origin: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except ConnectionError:
        offline = datasets.config.HF_HUB_OFFLINE
        reason = "the hub is offline (HF_HUB_OFFLINE is set)" if offline else "the hub is out of reach"
        raise ConnectionError(
            f"dataset {source!r}{origin} is a hub id, but {reason} and the hub cache has no copy; point "
            "input_file_path at a local copy: a .jsonl, .json or .parquet file, or a folder written by save_to_disk"
        ) from None


def is_hub_dataset(source: str | Path, root: Path | None = None) -> bool:
    """Whether `source` names a hub dataset rather than a local path: `owner/name` whose owner is no file or
    folder in `root` (default: the working directory), without a data file's suffix (a name with one is a
    missing file)."""
    return (
        isinstance(source, str)
        and "/" in source
        and is_hub_id(source, root or Path())
        and not any(source.endswith(suffix) for suffix in _BUILDERS)
    )


def _explain_json_error(path: Path, source: str | Path) -> None:
    """Raises DatasetFormatError for the first record of a JSON file that is not a JSON object, if any: the
    library's own error does not say where the file is broken."""
    if _is_json_array(path):
        try:
            records = json.loads("".join(text_lines(path)))
        except json.JSONDecodeError as bad:
            raise DatasetFormatError(source, bad.lineno, invalid_json(bad)) from None
        for number, record in enumerate(records if isinstance(records, list) else [], start=1):
            if not isinstance(record, dict):
                raise DatasetFormatError(source, number, "expected a JSON object", "record")
        return
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json_line(line)
        except json.JSONDecodeError as bad:
            raise DatasetFormatError(source, number, invalid_json(bad)) from None
        if not isinstance(record, dict):
            raise DatasetFormatError(source, number, f"expected a JSON object, got {type(record).__name__}")


def _one_json_object(path: Path) -> bool:
    """Whether a file the library read as a single record is one JSON object ({"data": [...]}, or one record
    spread over several lines) rather than JSON Lines with one record: the name says JSON, or the record takes
    more than one line."""
    nonblank = (line for line in text_lines(path) if line.strip())
    return _suffix(path) in (".json", ".json.gz") or len(list(itertools.islice(nonblank, 2))) > 1


def _is_json_array(path: Path) -> bool:
    for line in text_lines(path):
        if line.strip():
            return line.lstrip().startswith("[")
    return False


def _convert(
    table: _Table, convert: Callable[[dict, int], T | None], skip_invalid: bool, stats: dict[str, int] | None
) -> list[T]:
    """`convert` applied to each row (1-based index), dropping None; invalid rows raise or are skipped."""
    kept: list[T] = []
    skipped = 0
    for index, row in enumerate(table.rows, start=1):
        try:
            item = convert(row, index)
        except _InvalidRecord as error:
            if not skip_invalid:
                raise table.error(index, str(error)) from None
            skipped += 1
            continue
        if item is not None:
            kept.append(item)
    if skipped:
        logger.warning("skipped %d invalid record(s) in %s", skipped, table.source)
    if stats is not None:
        stats.update(records=len(table.rows), skipped_invalid=skipped, kept=len(kept))
    return kept


def _string(row: dict, name: str) -> str | None:
    """A string field, None when absent or null."""
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise _InvalidRecord(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _required(row: dict, name: str) -> str:
    value = _string(row, name)
    if value is None:
        raise _InvalidRecord(f"missing field {name!r}")
    if not value.strip():
        raise _InvalidRecord(f"field {name!r} is empty")
    return value


def _join(instruction: str, extra: str | None) -> str:
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


def _pair(prompt: str, reply: str, reply_field: str) -> list[_Turn]:
    return [_Turn("prompter", prompt, "field 'instruction'"), _Turn("assistant", reply, f"field {reply_field!r}")]


def _conversation(
    name: str, index: int, turns: list[_Turn], system: str | None = None, lang: str | None = None
) -> Conversation:
    """The Conversation of checked turns: alternating from a prompter, ending with an assistant, none blank.

    Message ids are "<loader>:<record>:<turn>", unique within one source."""
    if not turns:
        raise _InvalidRecord("no prompter/assistant turns")
    for number, turn in enumerate(turns):
        if turn.role != ROLES[number % 2]:
            raise _InvalidRecord(
                f"{turn.where} is out of order: turns must alternate prompter/assistant, starting with a prompter"
            )
        if not turn.text.strip():
            raise _InvalidRecord(f"{turn.where} is empty")
    if turns[-1].role != "assistant":
        raise _InvalidRecord(f"{turns[-1].where} is last; a conversation must end with an assistant turn")
    messages = tuple(
        Message(role=turn.role, text=turn.text, message_id=f"{name}:{index}:{number}")
        for number, turn in enumerate(turns, start=1)
    )
    return Conversation(messages=messages, system=system, lang=lang)


def _hh_turns(dialogue: str) -> list[_Turn]:
    # split() with a capturing group gives [text before the first marker, marker, text, marker, text, ...].
    parts = _HH_MARKER.split(dialogue)
    if len(parts) == 1:
        raise _InvalidRecord("field 'chosen' has no 'Human:' or 'Assistant:' turn marker")
    if parts[0].strip():
        raise _InvalidRecord("field 'chosen' has text before its first turn marker")
    return [
        _Turn(_HH_ROLES[marker], text.strip(), f"turn {number} ({marker})")
        for number, (marker, text) in enumerate(zip(parts[1::2], parts[2::2]), start=1)
    ]


def _chat_turns(messages: list) -> tuple[str | None, list[_Turn]]:
    """(system text, turns) of a `messages` list; a trailing user turn is dropped."""
    system = None
    turns: list[_Turn] = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise _InvalidRecord(f"message {number} must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        for name, value in (("role", role), ("content", content)):
            if value is None:
                raise _InvalidRecord(f"message {number} lacks field {name!r}")
            if not isinstance(value, str):
                raise _InvalidRecord(f"message {number} has a {name!r} that is not a string")
        if role == "system" and number == 1:
            system = content if content.strip() else None
        elif role == "system":
            raise _InvalidRecord(f"message {number} is a system message; only the first may be one")
        elif role in _CHAT_ROLES:
            turns.append(_Turn(_CHAT_ROLES[role], content, f"message {number} ({role})"))
        else:
            raise _InvalidRecord(f"message {number} has unknown role {role!r}")
    if turns and turns[-1].role == "prompter":
        turns.pop()
    return system, turns
