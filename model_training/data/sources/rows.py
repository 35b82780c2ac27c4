"""The rows of a source read through the `datasets` library, and turned into records one at a time.

A source is one of
- a local file: `.jsonl`, `.jsonl.gz`, `.json` (a JSON array, or JSON Lines), `.json.gz`, `.parquet`, or `.txt`
  (one row per line, in a `text` field);
- a local folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: `split` picks one);
- a Hugging Face hub id such as "databricks/databricks-dolly-15k", read with `datasets.load_dataset(source,
  split=split)`; this needs network, or the dataset in the hub cache. A string is taken for a hub id only
  when no such local path exists, it has the form "owner/name" without a known file suffix, and "owner" is
  not a local file or folder; anything else that does not exist is a FileNotFoundError. A hub id that can
  be neither downloaded nor found in the cache (offline) is a ConnectionError that names the config key.

Local files are converted into a temporary cache that is deleted after the load, so nothing lands in the
repository or in the user's home; hub downloads use the library's usual cache, since they are worth keeping.

Rows come back in source order. A malformed record raises FileFormatError naming the source, the record (1-based
line of a JSON Lines or text file, record of a JSON array, row of a parquet file, saved folder or hub dataset) and
what is wrong; with `skip_invalid` such records are skipped instead and counted in one warning. A file that the
library cannot parse at all (broken JSON, a .gz file that is not gzip or is cut short) is always an error: there
is no record to skip; the library reads a file that is one JSON object as one record, and the error about that
record says that a JSON list or JSON Lines was expected.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from model_training.data.records import (
    FileFormatError,
    InvalidRecord,
    Record,
    check_encodable,
    invalid_json,
    json_line,
    text_lines,
)
from model_training.data.sources.common import DatasetConfig, LoadContext, Splits, split_by_record
from model_training.hub import is_hub_id

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

T = TypeVar("T")


@dataclass(frozen=True)
class Table:
    """The rows of a source as the `datasets` library read them, and how to name one in a message."""

    source: str | Path
    rows: Any  # a datasets.Dataset (the library is imported lazily; see read_rows), or a list of dicts
    unit: str  # "line", "record" (of a JSON array), "row", or what the caller's records are ("instance")
    json_lines: Path | None = None  # a JSON Lines file, whose blank lines have no row

    def error(self, index: int, reason: str) -> FileFormatError:
        """The error for the 1-based row `index`."""
        number = index
        if self.json_lines is not None:
            # Found again only for the error: row i is the i-th non-blank line.
            nonblank = (n for n, line in enumerate(text_lines(self.json_lines), start=1) if line.strip())
            number = next(n for i, n in enumerate(nonblank, start=1) if i == index)
            if len(self.rows) == 1 and _one_json_object(self.json_lines):
                keys = ", ".join(repr(k) for k in self.rows[0])
                reason = (f"the file is a single JSON object (keys {keys}), not records ({reason}); expected a "
                          "JSON list of records or JSON Lines, one record per line")
        return FileFormatError(self.source, number, reason, self.unit)


def load_rows(
    path: str | Path, options: DatasetConfig, context: LoadContext, convert: Callable[[dict, int], Record | None]
) -> Splits:
    """The load of a source whose records are rows, split by record: `convert` of each row (see `convert_rows`)."""
    return split_by_record(convert_rows(read_rows(path, context.config_key), convert, options.skip_invalid), options)


def convert_rows(table: Table, convert: Callable[[dict, int], T | None], skip_invalid: bool) -> list[T]:
    """`convert` applied to each row (1-based index), dropping None; a row for which it raises InvalidRecord, or whose
    text no tokenizer encodes (`check_encodable`), raises FileFormatError, or is skipped under `skip_invalid`."""
    kept: list[T] = []
    skipped = 0
    for index, row in enumerate(table.rows, start=1):
        try:
            check_encodable(row)
            item = convert(row, index)
        except InvalidRecord as error:
            if not skip_invalid:
                raise table.error(index, str(error)) from None
            skipped += 1
            continue
        if item is not None:
            kept.append(item)
    if skipped:
        logger.warning("skipped %d invalid record(s) in %s", skipped, table.source)
    return kept


def read_rows(source: str | Path, config_key: str | None, split: str = "train") -> Table:
    """The rows of a source (see the module docstring for what a source may be); `split` picks the split of a hub
    dataset or a saved DatasetDict ("train+validation" joins two); `config_key` names the setting in messages."""
    # Imported here: `datasets` takes seconds to import, and the command line reads this module to check a config.
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _joined_splits(loaded, split, path)
        return Table(source, loaded, "row")
    origin = f" (set by {config_key})" if config_key else ""
    if not path.exists():
        if is_hub_dataset(source):
            return Table(source, _read_hub(str(source), split, origin), "row")
        raise FileNotFoundError(f"dataset file not found: {path}{origin}")
    builder = _BUILDERS.get(suffix(path))
    if builder is None:
        raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(_BUILDERS)} or a folder")
    # The library logs its own line about a JSON or Parquet file it cannot parse; the error below says where.
    for builder_name in ("json", "parquet"):
        logging.getLogger(f"datasets.packaged_modules.{builder_name}.{builder_name}").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="sources-cache-") as tmp:
        try:
            # keep_in_memory: the rows must outlive the temporary cache.
            rows = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=tmp,
                                         keep_in_memory=True)
        except Exception as err:
            if builder == "parquet":
                from model_training.config import first_line  # config imports the sources

                # pyarrow's own message ("Parquet magic bytes not found in footer") names no file.
                raise FileFormatError(source, None, f"not a readable Parquet file ({first_line(err)}); expected a "
                                      "whole .parquet file, as pandas or datasets write it") from None
            if builder != "json":
                raise
            _explain_json_error(path, source)
            if _is_json_array(path):
                raise
            # Every line is a JSON object, yet the library could not read the file: some versions of its Arrow
            # reader have no column for a field whose type changes from line to line (a number where the
            # other lines hold text). Read the lines here; the source's own checks then name the line and field.
            records = [json_line(line) for line in text_lines(path) if line.strip()]
            return Table(source, records, "line", json_lines=path)
    if builder == "parquet":
        return Table(source, rows, "row")
    if builder == "text" or _is_json_array(path):
        return Table(source, rows, "line" if builder == "text" else "record")
    return Table(source, rows, "line", json_lines=path)


def _joined_splits(loaded: Any, split: str, path: Path) -> Any:
    """The rows of `split` ("train", or "train+validation" as the hub reads it) of a saved DatasetDict."""
    import datasets

    names = split.split("+")
    missing = [name for name in names if name not in loaded]
    if missing:
        raise ValueError(f"{path} has no split {missing[0]!r}; its splits are {', '.join(loaded)}")
    return datasets.concatenate_datasets([loaded[name] for name in names])


def suffix(path: Path) -> str:
    """The suffix that names a file's format: `.jsonl.gz` for a compressed file, else the last one."""
    suffixes = path.suffixes
    return "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


def _read_hub(source: str, split: str, origin: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
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
        and not any(source.endswith(name) for name in _BUILDERS)
    )


def _explain_json_error(path: Path, source: str | Path) -> None:
    """Raises FileFormatError for the first record of a JSON file that is not a JSON object, if any: the
    library's own error does not say where the file is broken."""
    if _is_json_array(path):
        try:
            records = json.loads("".join(text_lines(path)))
        except json.JSONDecodeError as bad:
            raise FileFormatError(source, bad.lineno, invalid_json(bad)) from None
        for number, record in enumerate(records if isinstance(records, list) else [], start=1):
            if not isinstance(record, dict):
                raise FileFormatError(source, number, "expected a JSON object", "record")
        return
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json_line(line)
        except json.JSONDecodeError as bad:
            raise FileFormatError(source, number, invalid_json(bad)) from None
        if not isinstance(record, dict):
            raise FileFormatError(source, number, f"expected a JSON object, got {type(record).__name__}")


def _one_json_object(path: Path) -> bool:
    """Whether a file the library read as a single record is one JSON object ({"data": [...]}, or one record
    spread over several lines) rather than JSON Lines with one record: the name says JSON, or the record takes
    more than one line."""
    nonblank = (line for line in text_lines(path) if line.strip())
    return suffix(path) in (".json", ".json.gz") or len(list(itertools.islice(nonblank, 2))) > 1


def _is_json_array(path: Path) -> bool:
    for line in text_lines(path):
        if line.strip():
            return line.lstrip().startswith("[")
    return False
