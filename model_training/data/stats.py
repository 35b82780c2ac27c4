"""`--show_dataset_stats`: what each dataset contributes once filtered, formatted and truncated."""

from __future__ import annotations

import math

from model_training.data.registry import PreparedData, TokenizedSplit

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


def split_row(split: TokenizedSplit, side: str) -> dict[str, object]:
    lengths = sorted(len(s.input_ids) for s in split.samples)
    tokens = sum(lengths)
    supervised = sum(s.num_supervised for s in split.samples)
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


def format_stats(data: PreparedData) -> str:
    """A plain-text table, one row per dataset and split."""
    rows = [split_row(s, "train") for s in data.train] + [split_row(s, "val") for s in data.val]
    table = [list(_COLUMNS)] + [[str(row[c]) for c in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)
