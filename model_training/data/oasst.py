"""Load OpenAssistant (OASST) exports into supervised fine-tuning threads.

`load_oasst_export(path, lang=..., top_k=..., val_split=..., manual_seed=...)` is public Python API: it returns the
(train, validation) threads as the `oasst_export` source reads them (model_training/data/sources/oasst_export.py
and oasst1.py adapt this module to the source contract).

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

Ranking mode (`ranked=True`, OpenAssistant's `mode="rm"`, for the reward model and DPO): instead of threads, each
tree gives its ranked reply groups (`RankedGroup`): every path from the root to a prompter message whose messages pass
the thread filter, with that message's assistant replies that carry a rank (neither deleted nor synthetic), sorted
by rank, when there are at least two of them.

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

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from model_training.data.records import (
    ROLES,
    FileFormatError,
    InvalidRecord,
    Message,
    Thread,
    check_encodable,
    invalid_json,
    json_line,
    text_lines,
)
from model_training.data.selection import parse_languages, split_like_openassistant

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("message_id", "text", "role")
READY_STATE = "ready_for_export"


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


RankedGroup = tuple[Thread, list[Message]]
"""A prefix ending with a prompter message, and its ranked assistant replies, best first."""


@dataclass(frozen=True)
class ExportTrees:
    """What an export holds for `lang` and `top_k`: (message tree id, its threads) for every tree in `lang` that
    passes the tree filter, in file order (flat rows: the order in which the trees first appear), with no threads
    for a tree that gives none, since it still takes its place in the split (`split_trees`); and the threads of the
    trees left out for their language alone, which `--show_dataset_stats` counts as `other_language`."""

    trees: list[tuple[str, list[Thread]]]
    other_language: int


def load_oasst_export(
    input_file_path: str | Path,
    lang: str = "en",
    top_k: int | None = None,
    val_split: float = 0.2,
    manual_seed: int = 287631038922,
    skip_invalid: bool = False,
    config_key: str | None = None,
) -> tuple[list[Thread], list[Thread]]:
    """Read an OASST export and return (train, validation) threads, split by tree as the OpenAssistant trainer
    splits (`split_trees`).

    A thread alternates prompter/assistant messages, starts with a prompter and ends with an assistant.
    `lang` is a comma-separated list of prompt languages to keep. With `top_k`, a thread is dropped when one
    of its assistant messages has rank >= top_k, or no rank while its parent has several replies.
    With `skip_invalid`, malformed lines are skipped (and counted in a warning) instead of raising FileFormatError
    (in the flat form the whole tree of a malformed row is dropped). `config_key` names the setting the path came
    from, for the message of a missing file.
    """
    if not 0.0 <= val_split <= 1.0:
        raise ValueError(f"val_split must be between 0 and 1, got {val_split}")
    export = read_export(input_file_path, lang, top_k, skip_invalid, config_key)
    return split_trees(export.trees, val_split, manual_seed)


def read_export(
    input_file_path: str | Path,
    lang: str = "en",
    top_k: int | None = None,
    skip_invalid: bool = False,
    config_key: str | None = None,
    ranked: bool = False,
) -> ExportTrees:
    """The trees of an OASST export file (tree or flat form, see the module docstring), filtered as
    `load_oasst_export` describes, not split; with `ranked`, each tree's ranked reply groups instead of threads."""
    _check_top_k(top_k)
    path = Path(input_file_path)
    if not path.is_file():
        origin = f" (set by {config_key})" if config_key else ""
        raise FileNotFoundError(f"OASST export file not found: {path}{origin}")
    unit = "row" if path.suffix == ".parquet" else "line"
    return _export_trees(_records(path), path, unit, parse_languages(lang), top_k, skip_invalid, ranked=ranked)


def trees_from_rows(
    rows: Iterable[dict],
    source: str | Path,
    lang: str = "en",
    top_k: int | None = None,
    skip_invalid: bool = False,
    ranked: bool = False,
) -> ExportTrees:
    """The trees of flat `oasst1` rows (one message per row, as the `datasets` library yields them), with the
    filters of `load_oasst_export`, not split (`ranked`: as `read_export`). `source` names the rows in error
    messages, which count rows from 1; with `skip_invalid` a malformed row drops its whole tree, and a warning
    counts the rows skipped."""
    _check_top_k(top_k)
    langs = parse_languages(lang)
    return _export_trees(enumerate(rows, start=1), source, "row", langs, top_k, skip_invalid, _FlatTrees(langs),
                         ranked)


def split_trees(
    trees: list[tuple[str, list[Thread]]], val_split: float, seed: int
) -> tuple[list[Thread], list[Thread]]:
    """(train, validation) threads: the trees drawn as the OpenAssistant trainer draws them
    (`split_like_openassistant`), each tree's threads on its side, in file order."""
    train, val = split_like_openassistant([threads for _, threads in trees], val_split, seed)
    return [thread for threads in train for thread in threads], [thread for threads in val for thread in threads]


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 or None, got {top_k}")


def _export_trees(
    records: Iterable[tuple[int, str | dict]],
    source: str | Path,
    unit: str,
    langs: set[str],
    top_k: int | None,
    skip_invalid: bool,
    flat: _FlatTrees | None = None,
    ranked: bool = False,
) -> ExportTrees:
    """The ExportTrees of numbered records (see `_read_trees`); a warning counts the records skipped as invalid."""
    counts = {"skipped": 0, "other_language": 0}
    trees = _read_trees(records, source, unit, langs, skip_invalid, counts, flat)
    # `_tree_threads` drains the generator, which counts as it goes: the counts are whole only after it.
    export = ExportTrees(_tree_threads(trees, top_k, counts, ranked), counts["other_language"])
    if counts["skipped"]:
        logger.warning("skipped %d invalid %s(s) in %s", counts["skipped"], unit, source)
    return export


def _tree_threads(
    trees: Iterable[_Tree], top_k: int | None, counts: dict[str, int], ranked: bool
) -> list[tuple[str, list]]:
    """(tree id, threads or ranked groups) for the trees in the asked languages, in tree order, those without any
    included; those of the other trees are counted in `counts["other_language"]`."""
    kept = []
    for tree in trees:
        threads = list(_ranked_groups(tree.root, None, [], top_k) if ranked else _sft_threads(tree.root, top_k))
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
        except InvalidRecord as error:
            if not skip_invalid:
                raise FileFormatError(source, line_no, str(error), unit) from None
            counts["skipped"] += 1
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


def _decode(record: str | dict) -> dict:
    if isinstance(record, dict):
        return record
    try:
        row = json_line(record)
    except json.JSONDecodeError as error:
        raise InvalidRecord(invalid_json(error)) from None
    if not isinstance(row, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(row).__name__}")
    check_encodable(row, record)
    return row


def _eligible(tree_state: object, prompt: dict) -> bool:
    """The tree filter but for the language, which decides only whether the tree's threads are kept or counted."""
    return tree_state == READY_STATE and prompt.get("review_result") is True


def _check_fields(raw: object) -> None:
    """Checks what every message must have."""
    if not isinstance(raw, dict):
        raise InvalidRecord(f"a message must be a JSON object, got {type(raw).__name__}")
    for name in REQUIRED_FIELDS:
        if raw.get(name) is None:
            raise InvalidRecord(f"message {raw.get('message_id', '?')} lacks required field {name!r}")
    if raw["role"] not in ROLES:
        raise InvalidRecord(f"message {raw['message_id']} has unknown role {raw['role']!r}")
    if not isinstance(raw["text"], str):
        raise InvalidRecord(f"message {raw['message_id']} has a text that is not a string")


def _check_alternation(raw: dict, parent_role: str | None, parent_id: object) -> None:
    if parent_role is None and raw["role"] != "prompter":
        raise InvalidRecord(
            f"root message {raw['message_id']} has role {raw['role']!r}, expected 'prompter'"
        )
    if raw["role"] == parent_role:
        raise InvalidRecord(
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
        raise InvalidRecord(
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
        raise InvalidRecord("lacks required field 'prompt' (expected one message tree per line)")
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
        raise InvalidRecord(f"message {raw['message_id']} has replies that are not a list")
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
            raise InvalidRecord(f"message {message_id} lacks required field 'message_tree_id'")
        if tree_id in self.dropped:
            return
        if parent_id is None:
            _check_alternation(row, None, None)
            if tree_id in self.roots:
                raise InvalidRecord(f"tree {tree_id} has a second root message {message_id}")
            if not _eligible(row.get("tree_state"), row):
                self.dropped.add(tree_id)
                return
            if row.get("lang") not in self.langs:
                self.other_language.add(tree_id)
            node = self.roots[tree_id] = _Node(_message(row), [])
        else:
            parent = self.nodes.get(parent_id)
            if parent is None:
                raise InvalidRecord(
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


def _ranked_groups(node: _Node, parent: _Node | None, path: Thread, top_k: int | None) -> Iterator[RankedGroup]:
    """Depth-first, OpenAssistant's mode="rm": each prompter message on a path that passes the thread filter,
    with its ranked replies when it has at least two; a subtree under a rejected message is not visited."""
    if not _acceptable(node, parent, top_k):
        return
    path = [*path, node.message]
    if node.message.role == "prompter":
        ranked = sorted(
            (r.message for r in node.replies if r.message.rank is not None and not r.message.deleted
             and not r.message.synthetic and r.message.role == "assistant"),
            key=lambda message: message.rank,
        )
        if len(ranked) >= 2:
            yield path, ranked
    for reply in node.replies:
        yield from _ranked_groups(reply, node, path, top_k)
