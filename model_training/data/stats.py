"""`--show_dataset_stats`: what each dataset contributes once filtered, formatted and cut to its length limit.

A sample longer than the limit is counted as its first `limit` tokens (the cut when no random window is drawn,
model_training/data/windows.py); `truncated` counts those samples."""

from __future__ import annotations

import math

import numpy as np

from model_training.data.prepare import PreparedData, TokenizedSplit
from model_training.data.store import StoredSamples
from model_training.data.windows import EVALUATION, LengthRule

_COLUMNS = (
    "dataset", "split", "threads", "turns", "samples", "tokens", "p50", "p90", "p99", "max",
    "supervised%", "truncated", "dropped",
)


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile: a value that occurs in the data, no interpolation."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def split_row(split: TokenizedSplit, side: str, limit: int) -> dict[str, object]:
    """One row of the table: `split`'s samples cut to their first `limit` tokens."""
    samples = split.samples
    if isinstance(samples, StoredSamples):  # from the arrays, without building each sample
        lengths = sorted(np.minimum(samples.lengths, limit).tolist())
        supervised = int(samples.supervised_in_first(limit).sum())
    else:
        cut = [LengthRule(limit).apply(sample, EVALUATION, index) for index, sample in enumerate(samples)]
        lengths = sorted(len(s.input_ids) for s in cut)
        supervised = sum(s.num_supervised for s in cut)
    tokens = sum(lengths)
    return {
        "dataset": split.name,
        "split": side,
        "threads": split.threads,
        "turns": split.turns,
        "samples": len(split.samples),
        "tokens": tokens,
        "p50": _percentile(lengths, 50),
        "p90": _percentile(lengths, 90),
        "p99": _percentile(lengths, 99),
        "max": lengths[-1] if lengths else 0,
        "supervised%": f"{100 * supervised / tokens:.1f}" if tokens else "0.0",
        "truncated": split.truncated,
        "dropped": split.dropped,
    }


_FILTER_COLUMNS = ("dataset", "records", "other_language", "duplicates", "too_short", "too_long", "per_epoch")


def _table(columns: tuple[str, ...], rows: list[dict[str, object]]) -> str:
    table = [list(columns)] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)


def format_stats(data: PreparedData, per_epoch: list[int], max_length: int, val_max_length: int) -> str:
    """Two plain-text tables: one row per dataset and split, its samples cut to `max_length` (training) or
    `val_max_length`; then what each dataset's filters removed and how many of its training samples an epoch
    draws (`per_epoch`, from the mixture options)."""
    rows = [split_row(s, "train", max_length) for s in data.train]
    rows += [split_row(s, "val", val_max_length) for s in data.val]
    removed = [
        {"dataset": r.name, "records": r.records, "other_language": r.other_language, "duplicates": r.duplicates,
         "too_short": r.too_short, "too_long": r.too_long, "per_epoch": n}
        for r, n in zip(data.reports, per_epoch)
    ]
    return _table(_COLUMNS, rows) + "\n\nremoved by filters\n" + _table(_FILTER_COLUMNS, removed)
