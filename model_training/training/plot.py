"""Training curves of a run folder as one PNG, each stage's own metrics against its step, read from `metrics.jsonl`:
SFT's loss and next-token accuracy; the reward model's and DPO's loss, accuracy and margin (DPO: also its implicit
rewards and log-probabilities), each for training and every validation set; PPO's reward, KL, entropy, length, both
losses and clip fractions; GRPO's reward per function, its groups' spread and share without signal, KL (when it
holds a reference), entropy, length, loss and clip fractions; then the learning rate, tokens/s and (not PPO, GRPO)
the grad norm.

    python -m model_training.training.plot RUN_DIR [--out FILE]

The trainers write `RUN_DIR/training_curves.png` when they finish; this command redraws it for any run folder,
also one still training. matplotlib is imported only to draw, so training and `--show_config` never load it.
"""

from __future__ import annotations

import argparse
import json
import math
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

WIDTH, ROW_HEIGHT, DPI = 12.0, 4.0, 100  # 1200 pixels wide, 400 a row of panels
EVAL_KEY = re.compile(r"eval/(.+)/([^/]+)")  # the dataset name may hold a "/" (a hub id)


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
    ylabel: str
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


def stage_of(records: list[dict[str, Any]]) -> str:
    """The stage that wrote `records`, told by the metrics only it writes (sft, rm, dpo, rl), so that any run folder
    plots without its config."""
    keys = {key for r in records for key in r}
    if "flat_groups" in keys:  # the share of groups without signal: GRPO's alone
        return "grpo"
    if "reward" in keys or "kl" in keys:  # the rollouts' mean score: trainer_rl.py's alone
        return "rl"
    if "reward_chosen" in keys or any(key.endswith("/reward_chosen") for key in keys):
        return "dpo"
    if "margin" in keys or any(key.endswith("/margin") for key in keys):
        return "rm"
    return "sft"


STAGE_NAMES = {"sft": "SFT", "rm": "reward model", "dpo": "DPO", "rl": "PPO", "grpo": "GRPO"}

# Each stage's own panels before the common ones: (metric, title, y label). Training's value and every validation
# set's (eval/<set>/<metric>) share a panel.
STAGE_PANELS: dict[str, list[tuple[str, str, str]]] = {
    "sft": [("loss", "loss", "cross-entropy per supervised token"),
            ("accuracy", "next-token accuracy", "share of supervised tokens")],
    "rm": [("loss", "loss", "-log sigmoid(margin) per pair"),
           ("accuracy", "accuracy", "share of pairs ranked right"),
           ("margin", "margin", "reward better - reward worse")],
    "dpo": [("loss", "loss", "DPO loss per pair"),
            ("accuracy", "accuracy", "share of pairs, chosen above rejected"),
            ("margin", "margin", "implicit reward chosen - rejected")],
}  # fmt: skip


def curves(records: list[dict[str, Any]]) -> list[Panel]:
    """What the figure shows, panel by panel, for the stage that wrote `records`: the data, apart from any drawing."""
    return _PANELS[stage_of(records)](records)


def _loss_panels(records: list[dict[str, Any]], more: list[Panel] | None = None) -> list[Panel]:
    """SFT's, the reward model's and DPO's: their own metrics, each beside its validation values, `more`, then the
    step's."""
    stage = stage_of(records)
    eval_sets = sorted({m.group(1) for r in records for key in r if (m := EVAL_KEY.fullmatch(key))})
    panels = [Panel(title, ylabel, [_series("train", records, metric),
                                    *(_series(f"eval {name}", records, f"eval/{name}/{metric}", marked=True)
                                      for name in eval_sets)])
              for metric, title, ylabel in STAGE_PANELS[stage]]
    return panels + (more or []) + [
        Panel("learning rate", "learning rate", [_series("lr", records, "lr")]),
        Panel("tokens/s", "tokens/s, all ranks", [_series("tokens/s", records, "tokens_per_s")]),
        Panel("grad norm", "L2 norm of the gradient", [_series("grad norm", records, "grad_norm")]),
    ]


def _dpo_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """DPO's: the loss panels, with the implicit rewards and log-probabilities of the chosen and rejected replies."""
    return _loss_panels(records, [
        Panel("implicit rewards", "beta log(pi / pi_ref), summed",
              [_series("chosen", records, "reward_chosen"), _series("rejected", records, "reward_rejected")]),
        Panel("log-probabilities", "log pi of the reply, summed",
              [_series("chosen", records, "logp_chosen"), _series("rejected", records, "logp_rejected")]),
    ])


def _ppo_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """PPO's step metrics (training/ppo/recipe.py: METRICS, the two learning rates and speeds)."""

    def one(title: str, ylabel: str, key: str) -> Panel:
        return Panel(title, ylabel, [_series(key.replace("_", " "), records, key)])

    return [
        one("reward", "reward model's score, mean", "reward"),
        one("KL to the reference", "log pi - log pi_ref, summed", "kl"),
        one("entropy", "nats per token", "entropy"),
        one("length", "tokens per continuation", "length"),
        one("policy loss", "clipped surrogate", "policy_loss"),
        one("value loss", "clipped value loss", "value_loss"),
        Panel("clip fractions", "share of tokens clipped",
              [_series("policy", records, "policy_clipfrac"), _series("value", records, "value_clipfrac")]),
        Panel("learning rates", "learning rate", [_series("policy", records, "lr"),
                                                  _series("value", records, "value_lr")]),
        Panel("tokens/s", "tokens/s, all ranks", [_series("rollouts", records, "rollout_tokens_per_s"),
                                                  _series("training", records, "train_tokens_per_s")]),
    ]


def _grpo_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """GRPO's step metrics (training/ppo/recipe.py: GRPO_METRICS, each reward function's mean, the learning rate and
    speeds); its KL only where the run held a reference (kl_coef > 0)."""
    functions = sorted({key for r in records for key in r if key.startswith("reward/")})
    panels = [
        Panel("reward", "mean per continuation",
              [_series("total", records, "reward"), *(_series(key[7:], records, key) for key in functions)]),
        Panel("groups", "reward std within a group; share", [_series("reward std", records, "reward_std"),
                                                             _series("flat groups", records, "flat_groups")]),
    ]
    if any("kl" in r for r in records):
        panels.append(Panel("KL to the reference", "k3 estimate per token", [_series("kl", records, "kl")]))
    return panels + [
        Panel("entropy", "nats per token", [_series("entropy", records, "entropy")]),
        Panel("length", "tokens per continuation", [_series("length", records, "length")]),
        Panel("policy loss", "clipped surrogate (+ KL term)", [_series("policy loss", records, "policy_loss")]),
        Panel("clip fractions", "share of tokens clipped", [_series("low", records, "clip_low_frac"),
                                                            _series("high", records, "clip_high_frac")]),
        Panel("learning rate", "learning rate", [_series("lr", records, "lr")]),
        Panel("tokens/s", "tokens/s, all ranks", [_series("rollouts", records, "rollout_tokens_per_s"),
                                                  _series("training", records, "train_tokens_per_s")]),
    ]


def _series(label: str, records: list[dict[str, Any]], key: str, marked: bool = False) -> Series:
    """The steps whose record holds a number under `key` (a null grad norm is not a point)."""
    points = np.array([(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))], dtype=float)
    points = points.reshape(-1, 2)  # (0, 2) when no record has the key
    values = np.where(np.isfinite(points[:, 1]), points[:, 1], np.nan)  # inf too: it would wreck the y-range
    return Series(label, points[:, 0].astype(int), values, marked)


def draw(panels: list[Panel], title: str, xlabel: str = "optimizer step") -> Figure:
    """The figure of `panels`, two or three to a row, on the Agg canvas: no pyplot, so no GUI backend and no global
    figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = 2 if len(panels) <= 4 else 3
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(WIDTH, ROW_HEIGHT * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, sharex=True, squeeze=False).ravel()
    for index, ax in enumerate(axes):
        if index >= len(panels):
            ax.remove()  # the last row's empty places
            continue
        _draw_panel(ax, panels[index])
        if index + columns >= len(panels):  # the lowest panel of its column carries the step axis
            ax.set_xlabel(xlabel)
            ax.tick_params(labelbottom=True)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared: a short run gets no step 2.5
    fig.suptitle(title)
    return fig


def _plain(value: float, _position: int) -> str:
    """A tick as the number itself (0.0003, 2e-05, 12000), never as an offset or a power written apart from the ticks
    at the axis' end, which a reader misses."""
    return f"{value:g}"


def _draw_panel(ax: Axes, panel: Panel) -> None:
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))  # step 10,000 reads 10000, not 0 + 1e4
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


_PANELS = {"sft": _loss_panels, "rm": _loss_panels, "dpo": _dpo_panels, "rl": _ppo_panels, "grpo": _grpo_panels}
"""The figure of each kind of metrics.jsonl (`stage_of`): GRPO writes its own metrics, though it is no stage."""
STEP_NAMES = {"rl": "PPO step", "grpo": "GRPO step"}
"""The x axis of the stages whose step is not one optimizer step."""


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw `run_dir/metrics.jsonl` into `out` (default `run_dir/training_curves.png`); returns the PNG's path.
    Raises PlotError when there is nothing to plot."""
    run_dir = Path(run_dir)
    out = run_dir / CURVES if out is None else Path(out)
    records = read_records(run_dir / METRICS)
    stage = stage_of(records)
    fig = draw(curves(records), f"{run_dir} ({STAGE_NAMES[stage]}): step {records[-1]['step']}",
               STEP_NAMES.get(stage, "optimizer step"))
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
