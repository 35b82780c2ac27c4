"""Training curves of a run folder as one PNG: loss (train and every validation set), learning rate, tokens/s
and grad norm against the optimizer step, read from `metrics.jsonl`.

    python -m model_training.training.plot RUN_DIR [--out FILE]

The trainer writes `RUN_DIR/training_curves.png` when it finishes; this command redraws it for any run folder,
also one still training. matplotlib is imported only to draw, so training and `--show_config` never load it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model_training.layout import CURVES, METRICS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGSIZE, DPI = (12.0, 8.0), 100  # a 1200 x 800 pixel PNG
EVAL_LOSS = re.compile(r"eval/(.+)/loss")  # the dataset name may hold a "/" (a hub id)


class PlotError(ValueError):
    """Nothing to plot (no metrics file, an empty one, a line that is not a record); the message names the file."""


@dataclass
class Series:
    label: str
    steps: np.ndarray
    """Optimizer steps, ascending."""
    values: np.ndarray
    """One per step; NaN where the value was not finite (a skipped step), which the line leaves as a gap."""
    marked: bool = False
    """Each point drawn as a marker: evaluations are sparse, a bare line would hide where they were taken."""


@dataclass
class Panel:
    title: str
    series: list[Series]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, one per step, ascending. A resumed run appends the steps after its
    checkpoint again, so a step can appear twice: its later line wins."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise PlotError(f"cannot read {path}: {err.strerror}") from None
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # reads the NaN and Infinity that json.dumps writes for a skipped step
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError) as err:
            raise PlotError(f"{path}:{number}: not a metrics record with a step ({err})") from None
    if not by_step:
        raise PlotError(f"{path} holds no metrics records")
    return [by_step[step] for step in sorted(by_step)]


def curves(records: list[dict[str, Any]]) -> list[Panel]:
    """What the figure shows, panel by panel: the data, apart from any drawing."""
    eval_sets = sorted({m.group(1) for r in records for key in r if (m := EVAL_LOSS.fullmatch(key))})
    losses = [_series("train", records, "loss")]
    losses += [_series(f"eval {name}", records, f"eval/{name}/loss", marked=True) for name in eval_sets]
    return [
        Panel("loss", losses),
        Panel("learning rate", [_series("lr", records, "lr")]),
        Panel("tokens/s", [_series("tokens/s", records, "tokens_per_s")]),
        Panel("grad norm", [_series("grad norm", records, "grad_norm")]),
    ]


def _series(label: str, records: list[dict[str, Any]], key: str, marked: bool = False) -> Series:
    """The steps whose record holds a number under `key` (a null grad norm is not a point)."""
    points = np.array([(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))], dtype=float)
    points = points.reshape(-1, 2)  # (0, 2) when no record has the key
    values = np.where(np.isfinite(points[:, 1]), points[:, 1], np.nan)  # inf too: it would wreck the y-range
    return Series(label, points[:, 0].astype(int), values, marked)


def draw(panels: list[Panel], title: str) -> Figure:
    """The 2 x 2 figure of `panels`, on the Agg canvas: no pyplot, so no GUI backend and no global figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel)
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared: a short run gets no step 2.5
    fig.suptitle(title)
    return fig


def _draw_panel(ax: Axes, panel: Panel) -> None:
    ax.set_title(panel.title)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", scilimits=(-3, 4))  # a learning rate reads 2e-5, not 0.00002
    if not any(len(s.steps) for s in panel.series):
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        return
    for s in panel.series:
        # A lone point draws no line; a marker keeps a one-step run visible.
        ax.plot(s.steps, s.values, marker="o" if s.marked or len(s.steps) == 1 else None, markersize=4, label=s.label)
        bad = s.steps[np.isnan(s.values)]
        if len(bad):
            # A gap is easy to miss: a red cross on the panel's floor (x in steps, y in axes units) at each one.
            floor = ax.get_xaxis_transform()
            label = f"{s.label}: not finite"
            ax.plot(bad, np.zeros(len(bad)), "x", color="red", transform=floor, clip_on=False, label=label)
    ax.legend(fontsize="small")


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw `run_dir/metrics.jsonl` into `out` (default `run_dir/training_curves.png`); returns the PNG's path.
    Raises PlotError when there is nothing to plot."""
    run_dir = Path(run_dir)
    out = run_dir / CURVES if out is None else Path(out)
    records = read_records(run_dir / METRICS)
    fig = draw(curves(records), f"{run_dir}: step {records[-1]['step']}")
    fig.savefig(out, dpi=DPI)  # the dpi again: a user's matplotlibrc may set savefig.dpi
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (output_dir) that holds metrics.jsonl")
    parser.add_argument("--out", type=Path, help=f"the PNG to write (default RUN_DIR/{CURVES})")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except (PlotError, OSError) as err:  # OSError: an --out that cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
