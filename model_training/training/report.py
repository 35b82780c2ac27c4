"""What a run says of its results on the console (rank 0): one line per validation set at each evaluation, one line
per logged PPO step, and a summary when the run ends. The numbers are those of metrics.jsonl."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from model_training.layout import CHECKPOINT_RE, CURVES, METRICS, ROLLOUT_SAMPLES, SAMPLES_MD
from model_training.training.plot import PlotError, read_records

_SHOWN = ("loss", "accuracy", "margin")
"""The validation metrics a line shows, of those a stage has (SFT: loss and accuracy; reward model, DPO: margin
too); DPO's rewards and log-probabilities stay in metrics.jsonl."""


def _value(name: str, value: float) -> str:
    return f"{name} {value:.1%}" if name == "accuracy" else f"{'KL' if name == 'kl' else name} {value:.4g}"


def eval_lines(step: int, results: dict[str, float], prefix: str = "step {step} validation") -> list[str]:
    """`eval/<set>/<metric>` results -> one line per set: "step 50 validation oasst_export: loss 2.357, accuracy
    58.3%" (`prefix` formatted with the step)."""
    sets: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        _, name, metric = key.split("/", 2)
        sets.setdefault(name, {})[metric] = value
    start = prefix.format(step=step)
    return [f"{start} {name}: " + ", ".join(_value(m, found[m]) for m in _SHOWN if m in found)
            for name, found in sets.items()]


def rl_line(step: int, record: dict[str, Any]) -> str:
    """A logged PPO or GRPO step: "step 4: reward 0.1234, KL 0.0101, entropy 7.1, length 31.5 tokens", GRPO's with
    the share of its groups whose rewards are all equal ("flat groups 25%"), its KL only where a reference is held."""
    parts = [f"reward {record['reward']:.4g}"]
    if "kl" in record:
        parts.append(f"KL {record['kl']:.4g}")
    parts += [f"entropy {record['entropy']:.4g}", f"length {record['length']:.1f} tokens"]
    if "flat_groups" in record:
        parts.append(f"flat groups {100 * record['flat_groups']:.0f}%")
    return f"step {step}: " + ", ".join(parts)


def run_summary(output_dir: Path, steps: int, wall_seconds: float, tokens: int, train_seconds: float) -> list[str]:
    """The lines that end a run: its last metrics, steps, time and throughput, the best (lowest mean validation loss)
    and last checkpoints, the plot and samples, and the command that exports it."""
    records = _records(output_dir / METRICS)
    trained = [r for r in records if "loss" in r or "reward" in r]
    evaluated = [r for r in records if any(k.startswith("eval/") for k in r)]
    lines = [f"done: {steps} steps in {_duration(wall_seconds)}, {tokens / max(train_seconds, 1e-9):,.0f} tokens/s "
             f"while training; run folder {output_dir}"]
    if trained:
        last = trained[-1]
        shown = ("reward", "kl", "length") if "reward" in last else ("loss", *_SHOWN[1:])
        lines.append(f"last step {last['step']}: " + ", ".join(_value(m, last[m]) for m in shown if m in last))
    if evaluated:
        lines += eval_lines(evaluated[-1]["step"], _evals(evaluated[-1]), "last validation (step {step})")
    checkpoints = sorted(p for p in output_dir.glob("checkpoint-*") if CHECKPOINT_RE.fullmatch(p.name))
    if checkpoints:
        best = _best(checkpoints, evaluated)
        lines.append(f"checkpoints: last {checkpoints[-1]}" + (f", best (validation loss) {best}" if best else ""))
    for label, name in (("plot", CURVES), ("samples", SAMPLES_MD), ("samples", ROLLOUT_SAMPLES)):
        if (output_dir / name).is_file():
            lines.append(f"{label}: {output_dir / name}")
    if checkpoints:
        export = f"{output_dir}-export"
        lines.append(f"next, export it: python export_model.py {shlex.quote(str(output_dir))} --output_folder "
                     f"{shlex.quote(export)}")
    return lines


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        return read_records(path)
    except PlotError:  # none written (logging off), or unreadable: the summary says the rest
        return []


def _evals(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith("eval/")}


def _best(checkpoints: list[Path], evaluated: list[dict[str, Any]]) -> Path | None:
    """The checkpoint whose step has the lowest mean validation loss over the sets; None when none was evaluated."""
    losses = {}
    for record in evaluated:
        values = [v for k, v in record.items() if k.startswith("eval/") and k.endswith("/loss")]
        if values:
            losses[record["step"]] = sum(values) / len(values)
    scored = [(losses[int(CHECKPOINT_RE.fullmatch(p.name).group(1))], p) for p in checkpoints
              if int(CHECKPOINT_RE.fullmatch(p.name).group(1)) in losses]
    return min(scored)[1] if scored else None


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"
