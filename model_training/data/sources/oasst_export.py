"""`oasst_export`: an OpenAssistant export file, read by model_training/data/oasst.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_training.data.oasst import ExportTrees, RankedGroup, read_export, split_trees
from model_training.data.records import Comparison, Conversation, Thread
from model_training.data.sources.common import ComparisonSplits, DatasetConfig, LoadContext, Splits


@dataclass
class OasstExportConfig(DatasetConfig):
    """An OpenAssistant export: message trees (or the flat `oasst1` rows) in `.jsonl`, `.jsonl.gz` or `.parquet`."""

    input_file_path: str = "oasst_sample.jsonl.gz"
    """The export file; a relative path is looked up in `cache_dir`, then in `data_dir`."""
    lang: str = "en"
    """Comma-separated languages of the prompts to keep, e.g. "en,de"."""
    top_k: int | None = None
    """Keep only paths whose assistant replies are ranked better than `top_k` (1: the best reply); null: all. In
    the preference stages it filters the replies of each prefix, not the ranked replies themselves."""
    val_split: float = 0.2
    """Fraction of message trees (never single threads) held out for validation."""


def load(path: str | Path, options: OasstExportConfig, context: LoadContext) -> Splits:
    """The threads of the export's trees that pass its filters, split by tree as the OpenAssistant trainer splits."""
    return oasst_splits(read_export(path, options.lang, options.top_k, options.skip_invalid, context.config_key),
                        options, context)


def compare(path: str | Path, options: OasstExportConfig, context: LoadContext) -> ComparisonSplits:
    """The export's ranked reply groups (OpenAssistant's mode="rm"), split by tree as `load` splits."""
    export = read_export(path, options.lang, options.top_k, options.skip_invalid, context.config_key, ranked=True)
    return oasst_comparisons(export, options, context)


def oasst_comparisons(export: ExportTrees, options: DatasetConfig, context: LoadContext) -> ComparisonSplits:
    """(train, validation) comparisons of an export's ranked groups, split by tree (`split_trees`) as
    `oasst_splits` splits threads. Shared with the `oasst1` source."""
    context.report.add_other_language(export.other_language)
    train, val = split_trees(export.trees, options.val_split, options.manual_seed)
    return [_comparison(group) for group in train], [_comparison(group) for group in val]


def _comparison(group: RankedGroup) -> Comparison:
    prefix, replies = group
    return Comparison(prefix=tuple(prefix), replies=tuple(m.text for m in replies), lang=prefix[0].lang)


def oasst_splits(export: ExportTrees, options: DatasetConfig, context: LoadContext) -> Splits:
    """(train, validation) conversations of an export's trees, split by tree (`split_trees`); the threads left out
    for their language are counted in the report. Shared with the `oasst1` source."""
    context.report.add_other_language(export.other_language)
    train, val = split_trees(export.trees, options.val_split, options.manual_seed)
    return [_conversation(thread) for thread in train], [_conversation(thread) for thread in val]


def _conversation(thread: Thread) -> Conversation:
    return Conversation(messages=tuple(thread), lang=thread[0].lang)
