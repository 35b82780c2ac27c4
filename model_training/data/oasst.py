"""Load OpenAssistant (OASST) exports into supervised fine-tuning threads.

Two input layouts are accepted, detected per file from its first readable record:

- tree form (`.jsonl` or `.jsonl.gz`): one message tree per line, `{"message_tree_id", "tree_state",
  "prompt": {..., "replies": [...]}}`, as written by the OASST export tool;
- flat form (`.jsonl`, `.jsonl.gz` or `.parquet`): one message per row, as in the released `oasst1` dataset.
  Every row carries `message_tree_id` and `tree_state`, a parent row comes before its children, and
  `emojis`/`labels` are parallel lists (`{"name": [...], "value": [...], "count": [...]}`).

Only `message_id`, `text` and `role` are required on a message (and `message_tree_id` on a flat row, which
is how rows name their tree); every other field may be missing and then means null. Every message of a
tree-form line is checked for the required fields and for alternating roles, including trees that the
filters drop; the optional fields (rank, labels) are converted, and so checked, only for trees that are
ready for export with a reviewed prompt. Flat rows are each checked for their own fields; the checks that
need the parent (it exists on an earlier row, roles alternate) run only for such trees, because the rows of
the other trees are not kept.

Trees in other languages than `lang` are built like kept trees but only their threads are counted (the
`other_language` count of `--show_dataset_stats`, in threads like the count of every other source).

Train/validation split: trees, never threads, are split, as the OpenAssistant trainer splits them
(`split_like_openassistant` in model_training/data/selection.py): the list of every tree that passes the tree
filter, in file order (for flat rows: the order in which the trees first appear), trees that yield no thread
included, is drawn from by torch's `random_split` with a generator seeded with `manual_seed`. The same export,
`lang`, `val_split` and `manual_seed` thus give the same validation trees as its runs; reordering the file
changes them. Threads keep file order within each side.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from model_training.data.selection import parse_languages, split_like_openassistant

logger = logging.getLogger(__name__)

ROLES = ("prompter", "assistant")
REQUIRED_FIELDS = ("message_id", "text", "role")
READY_STATE = "ready_for_export"


class FileFormatError(ValueError):
    """A data file does not hold what its format promises; the message names the file, the 1-based line (or
    record, or row) and what was wrong."""

    def __init__(self, path: str | Path, line: int, reason: str, unit: str = "line") -> None:
        super().__init__(f"{path}, {unit} {line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class OasstFormatError(FileFormatError):
    """A record of an export is malformed."""


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
class _Node:
    message: Message
    # Every reply, deleted ones included: the leaf and first-reply rules and the top_k rule count them.
    replies: list[_Node]


@dataclass(frozen=True)
class _Tree:
    tree_id: str
    root: _Node
    # False for a tree whose prompt is in none of the languages asked for: its threads are only counted.
    in_language: bool = True


class _InvalidRecord(Exception):
    """Raised while reading one record; turned into OasstFormatError (or a skip) with the line number."""


def load_oasst_export(
    input_file_path: str | Path,
    lang: str = "en",
    top_k: int | None = None,
    val_split: float = 0.2,
    manual_seed: int = 287631038922,
    mode: str = "sft",
    skip_invalid: bool = False,
    config_key: str | None = None,
    stats: dict[str, int] | None = None,
) -> tuple[list[Thread], list[Thread]]:
    """Read an OASST export and return (train, validation) threads.

    A thread alternates prompter/assistant messages, starts with a prompter and ends with an assistant.
    `lang` is a comma-separated list of prompt languages to keep. With `top_k`, a thread is dropped when one
    of its assistant messages has rank >= top_k, or no rank while its parent has several replies.

    With `skip_invalid`, malformed lines are skipped and counted instead of raising OasstFormatError (in the
    flat form the whole tree of a malformed row is dropped). When `stats` is given, it is filled with
    `records`, `skipped_lines`, `other_language` (threads of trees that pass every filter but the language),
    `train_trees`, `val_trees` (the trees in `lang` that pass the tree filter, those without threads included),
    `train_threads` and `val_threads`.
    `config_key` names the setting the path came from, for the message of a missing file.
    """
    if mode != "sft":
        raise ValueError(f"unknown OASST export mode {mode!r}; only 'sft' is supported")
    if not 0.0 <= val_split <= 1.0:
        raise ValueError(f"val_split must be between 0 and 1, got {val_split}")
    _check_top_k(top_k)
    path = Path(input_file_path)
    if not path.is_file():
        origin = f" (set by {config_key})" if config_key else ""
        raise FileNotFoundError(f"OASST export file not found: {path}{origin}")

    counts = {"records": 0, "skipped_lines": 0, "other_language": 0}
    unit = "row" if path.suffix == ".parquet" else "line"
    trees = _read_trees(_records(path), path, unit, parse_languages(lang), skip_invalid, counts)
    threads_per_tree = [threads for _, threads in _tree_threads(trees, top_k, counts)]
    if counts["skipped_lines"]:
        logger.warning("skipped %d invalid line(s) in OASST export %s", counts["skipped_lines"], path)
    train_trees, val_trees = split_like_openassistant(threads_per_tree, val_split, manual_seed)
    train = [thread for threads in train_trees for thread in threads]
    val = [thread for threads in val_trees for thread in threads]
    if stats is not None:
        stats.update(
            counts,
            train_trees=len(train_trees),
            val_trees=len(val_trees),
            train_threads=len(train),
            val_threads=len(val),
        )
    return train, val


def trees_from_rows(
    rows: Iterable[dict],
    source: str | Path,
    lang: str = "en",
    top_k: int | None = None,
    skip_invalid: bool = False,
    stats: dict[str, int] | None = None,
) -> list[tuple[str, list[Thread]]]:
    """(message tree id, its threads) for flat `oasst1` rows (one message per row, as the `datasets` library
    yields them), with the filters of `load_oasst_export` and no train/validation split: every tree in `lang`
    that passes the tree filter, in the order the trees first appear in the rows, with no threads for a tree
    that yields none (the list `split_like_openassistant` draws from).

    `source` names the rows in error messages, which count rows from 1. `stats` gets `records`, `skipped_lines`
    (the malformed rows skipped with `skip_invalid`; their whole tree is dropped) and `other_language`.
    """
    _check_top_k(top_k)
    counts = {"records": 0, "skipped_lines": 0, "other_language": 0}
    langs = parse_languages(lang)
    trees = _read_trees(enumerate(rows, start=1), source, "row", langs, skip_invalid, counts, _FlatTrees(langs))
    tree_threads = _tree_threads(trees, top_k, counts)
    if stats is not None:
        stats.update(counts)
    return tree_threads


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 or None, got {top_k}")


def _tree_threads(trees: Iterable[_Tree], top_k: int | None, counts: dict[str, int]) -> list[tuple[str, list[Thread]]]:
    """(tree id, threads) for the trees in the asked languages, in tree order, those without threads included;
    the threads of the other trees are counted in `counts["other_language"]`."""
    kept = []
    for tree in trees:
        threads = list(_sft_threads(tree.root, top_k))
        if tree.in_language:
            kept.append((tree.tree_id, threads))
        else:
            counts["other_language"] += len(threads)
    return kept


def _read_trees(
    records: Iterable[tuple[int, str | dict]],
    source: str | Path,
    unit: str,
    langs: set[str],
    skip_invalid: bool,
    counts: dict[str, int],
    flat: _FlatTrees | None = None,
) -> Iterator[_Tree]:
    """Yield the trees that pass the tree filter, in record order, handling malformed records as asked.

    The form is detected from the first readable record unless `flat` is given (the caller knows the rows
    are flat)."""
    form_known = flat is not None
    for line_no, record in records:
        counts["records"] += 1
        row: object = None
        try:
            row = _decode(record)
            if not form_known:
                form_known = True
                if "prompt" not in row and "message_id" in row and "message_tree_id" in row:
                    flat = _FlatTrees(langs)
            if flat is not None:
                flat.add(row)
                continue
            tree = _parse_tree(row, langs)
        except _InvalidRecord as error:
            if not skip_invalid:
                raise OasstFormatError(source, line_no, str(error), unit) from None
            counts["skipped_lines"] += 1
            if flat is not None and isinstance(row, dict):
                flat.drop(row.get("message_tree_id"))
            continue
        if tree is not None:
            yield tree
    if flat is not None:
        yield from flat.trees()


def _records(path: Path) -> Iterator[tuple[int, str | dict]]:
    """(1-based line or row number, raw JSON text or parquet row), streamed; blank lines are skipped."""
    if path.suffix == ".parquet":
        # Imported here: pyarrow is slow to import and only the parquet form needs it.
        import pyarrow.parquet as pq

        row_no = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
        return
    for line_no, line in enumerate(text_lines(path), start=1):
        if line.strip():
            yield line_no, line


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, gunzipped when the name ends in .gz. A file that is not what its name
    says raises FileFormatError at the line where reading failed: the first for data that is not gzip, the
    one after the last whole line for a gzip stream cut short."""
    opener = gzip.open if path.suffix == ".gz" else open
    read = 0
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
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


def json_line(line: str) -> object:
    """One JSON Lines record; a decoder error's column then counts from the start of that line."""
    return json.loads(line.rstrip("\n"))


def invalid_json(error: json.JSONDecodeError) -> str:
    """What is wrong with a record that is not JSON, at the decoder's column. Messages that end in "at" ("Unterminated
    string starting at") name the column where the broken token starts."""
    return f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"


def _decode(record: str | dict) -> dict:
    if isinstance(record, dict):
        return record
    try:
        row = json_line(record)
    except json.JSONDecodeError as error:
        raise _InvalidRecord(invalid_json(error)) from None
    if not isinstance(row, dict):
        raise _InvalidRecord(f"expected a JSON object, got {type(row).__name__}")
    return row


def _eligible(tree_state: object, prompt: dict) -> bool:
    """The tree filter but for the language, which decides only whether the tree's threads are kept or counted."""
    return tree_state == READY_STATE and prompt.get("review_result") is True


def _check_fields(raw: object) -> None:
    """Checks what every message must have."""
    if not isinstance(raw, dict):
        raise _InvalidRecord(f"a message must be a JSON object, got {type(raw).__name__}")
    for name in REQUIRED_FIELDS:
        if raw.get(name) is None:
            raise _InvalidRecord(f"message {raw.get('message_id', '?')} lacks required field {name!r}")
    if raw["role"] not in ROLES:
        raise _InvalidRecord(f"message {raw['message_id']} has unknown role {raw['role']!r}")
    if not isinstance(raw["text"], str):
        raise _InvalidRecord(f"message {raw['message_id']} has a text that is not a string")


def _check_alternation(raw: dict, parent_role: str | None, parent_id: object) -> None:
    if parent_role is None and raw["role"] != "prompter":
        raise _InvalidRecord(
            f"root message {raw['message_id']} has role {raw['role']!r}, expected 'prompter'"
        )
    if raw["role"] == parent_role:
        raise _InvalidRecord(
            f"message {raw['message_id']} has role {raw['role']!r} like its parent {parent_id}"
        )


def _message(raw: dict) -> Message:
    """The Message of a checked record; the optional fields are converted here, for kept trees only."""
    try:
        rank = raw.get("rank")
        # The flat dataset stores rank as a float column.
        rank = None if rank is None else int(rank)
        labels = _label_values(raw.get("labels") or {})
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise _InvalidRecord(
            f"message {raw['message_id']} has a malformed rank or labels ({error})"
        ) from None
    return Message(
        role=raw["role"],
        text=raw["text"],
        message_id=str(raw["message_id"]),
        lang=raw.get("lang"),
        rank=rank,
        labels=labels,
        synthetic=bool(raw.get("synthetic")),
        deleted=bool(raw.get("deleted")),
    )


def _label_values(labels: dict) -> dict[str, float]:
    if isinstance(labels.get("name"), list):  # flat dataset: parallel lists
        return {name: float(value) for name, value in zip(labels["name"], labels["value"], strict=True)}
    return {name: float(label["value"]) for name, label in labels.items()}


def _parse_tree(row: dict, langs: set[str]) -> _Tree | None:
    """Checks the whole tree of a line; builds it only when it passes the tree filter."""
    if "prompt" not in row:
        raise _InvalidRecord("lacks required field 'prompt' (expected one message tree per line)")
    prompt = row["prompt"]
    _check_fields(prompt)  # the tree filter reads the prompt's fields
    # Trees not ready or not reviewed are checked without building their messages: most of a full export is.
    root = _parse_node(prompt, None, _eligible(row.get("tree_state"), prompt))
    if root is None:
        return None
    return _Tree(str(row.get("message_tree_id") or prompt["message_id"]), root, prompt.get("lang") in langs)


def _parse_node(raw: object, parent: dict | None, build: bool) -> _Node | None:
    _check_fields(raw)
    if parent is None:
        _check_alternation(raw, None, None)
    else:
        _check_alternation(raw, parent["role"], parent["message_id"])
    replies = raw.get("replies") or []
    if not isinstance(replies, list):
        raise _InvalidRecord(f"message {raw['message_id']} has replies that are not a list")
    nodes = [_parse_node(reply, raw, build) for reply in replies]
    return _Node(_message(raw), nodes) if build else None


class _FlatTrees:
    """Rebuilds message trees from one-message-per-row data, keeping only trees that pass the tree filter."""

    def __init__(self, langs: set[str]) -> None:
        self.langs = langs
        self.roots: dict[str, _Node] = {}  # tree id -> root, in file order
        self.nodes: dict[str, _Node] = {}  # message id -> node, for kept trees only
        self.dropped: set[str] = set()  # trees that failed the filter or had a malformed row
        self.other_language: set[str] = set()  # kept only to count their threads

    def add(self, row: dict) -> None:
        _check_fields(row)
        message_id, tree_id, parent_id = row["message_id"], row.get("message_tree_id"), row.get("parent_id")
        if tree_id is None:
            raise _InvalidRecord(f"message {message_id} lacks required field 'message_tree_id'")
        if tree_id in self.dropped:
            return
        if parent_id is None:
            _check_alternation(row, None, None)
            if tree_id in self.roots:
                raise _InvalidRecord(f"tree {tree_id} has a second root message {message_id}")
            if not _eligible(row.get("tree_state"), row):
                self.dropped.add(tree_id)
                return
            if row.get("lang") not in self.langs:
                self.other_language.add(tree_id)
            node = self.roots[tree_id] = _Node(_message(row), [])
        else:
            parent = self.nodes.get(parent_id)
            if parent is None:
                raise _InvalidRecord(
                    f"message {message_id}: parent {parent_id} does not appear on an earlier row"
                )
            _check_alternation(row, parent.message.role, parent_id)
            node = _Node(_message(row), [])
            parent.replies.append(node)
        self.nodes[node.message.message_id] = node

    def drop(self, tree_id: object) -> None:
        if isinstance(tree_id, str):
            self.dropped.add(tree_id)
            self.roots.pop(tree_id, None)

    def trees(self) -> Iterator[_Tree]:
        for tree_id, root in self.roots.items():
            yield _Tree(tree_id, root, tree_id not in self.other_language)


def _acceptable(node: _Node, parent: _Node | None, top_k: int | None) -> bool:
    """The thread filter for one message of a path; a path passes when all of its messages do."""
    message = node.message
    if message.deleted or message.synthetic:
        return False
    if top_k is None or message.role != "assistant":
        return True
    if message.rank is None:
        return parent is None or len(parent.replies) <= 1
    return message.rank < top_k


def _sft_threads(root: _Node, top_k: int | None) -> Iterator[Thread]:
    """Depth-first over root-to-leaf paths; a subtree under a rejected message is not visited, since every
    path through it would be rejected."""
    if not _acceptable(root, None, top_k):
        return
    path = [root]
    pending: list[Iterator[_Node]] = [iter(root.replies)]
    while pending:
        node = next(pending[-1], None)
        if node is None:
            pending.pop()
            path.pop()
            continue
        parent = path[-1]
        if not _acceptable(node, parent, top_k):
            continue
        path.append(node)
        if node.replies:
            pending.append(iter(node.replies))
            continue
        # A prompter leaf closes a thread only as its parent's first reply, so that the assistant path above
        # it is emitted once; the trailing prompter itself is not trained on.
        if node.message.role == "assistant" or parent.replies[0] is node:
            yield [n.message for n in (path[:-1] if node.message.role == "prompter" else path)]
        path.pop()


