"""`oasst1`: the released flat OASST dataset (one message per row), read as message trees."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_training.data.oasst import ExportTrees, trees_from_rows
from model_training.data.records import FileFormatError
from model_training.data.sources.common import ComparisonSplits, DatasetConfig, LoadContext, Splits
from model_training.data.sources.oasst_export import oasst_comparisons, oasst_splits
from model_training.data.sources.rows import read_rows


@dataclass
class Oasst1Config(DatasetConfig):
    """The released flat OASST dataset (one message per row): a `datasets` folder, jsonl/parquet rows, a hub id."""

    input_file_path: str = "OpenAssistant/oasst1"
    """The hub id, a `datasets` folder saved from it, or its rows as a .jsonl/.parquet file."""
    lang: str = "en"
    """Comma-separated languages of the prompts to keep."""
    top_k: int | None = None
    """As for oasst_export."""


def load(path: str | Path, options: Oasst1Config, context: LoadContext) -> Splits:
    """The rows' message trees (model_training/data/oasst.py: `message_id`, `text`, `role` and `message_tree_id`
    required, a parent row before its children), filtered and split by tree exactly as `oasst_export`. The
    `train` and `validation` splits of the hub dataset (or of a saved DatasetDict) are read as one list of trees,
    as the OpenAssistant trainer reads them; a malformed row drops its whole tree under `skip_invalid`."""
    return oasst_splits(_trees(path, options, context, ranked=False), options, context)


def compare(path: str | Path, options: Oasst1Config, context: LoadContext) -> ComparisonSplits:
    """The rows' ranked reply groups, as `oasst_export`'s `compare` reads an export file."""
    return oasst_comparisons(_trees(path, options, context, ranked=True), options, context)


def _trees(path: str | Path, options: Oasst1Config, context: LoadContext, ranked: bool) -> ExportTrees:
    table = read_rows(path, context.config_key, split="train+validation")
    try:
        return trees_from_rows(table.rows, table.source, options.lang, options.top_k, options.skip_invalid, ranked)
    except FileFormatError as error:
        # The reader counts rows; the table names the line of a JSON Lines file, whose blank lines have no row.
        raise table.error(error.line, error.reason) from None
