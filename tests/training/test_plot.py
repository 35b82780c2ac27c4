"""training_curves.png: the series plotted from metrics.jsonl (resumes, skipped steps, several validation sets),
the PNG itself, the command's errors, the trainer's call and its wandb image."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, cpu_env
from matplotlib.image import imread

from model_training.config import load_config, parse_override
from model_training.layout import CURVES
from model_training.training.metrics import MetricsLogger
from model_training.training.plot import curves, draw, main, plot_run, read_records, stage_of
from model_training.training.ppo.recipe import GRPO_METRICS
from model_training.training.ppo.recipe import METRICS as PPO_METRICS
from model_training.training.preference_loss import DPO_METRICS, RM_METRICS

PNG_SHAPE = (800, 1200, 4)  # two rows of panels (SFT's five) x 400 pixels, 1200 wide, RGBA


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    """As MetricsLogger writes them: json.dumps, so a skipped step's loss is the bare token NaN."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def train_record(step: int, loss: float, **extra: float) -> dict:
    return dict(step=step, loss=loss, lr=step * 1e-5, grad_norm=1.0 / step, tokens_per_s=100.0 * step, **extra)


def resumed_run(run_dir: Path) -> Path:
    """Steps 1-6 (step 3 skipped: NaN loss, infinite grad norm; evaluation of two sets at 4), then a resume from
    the checkpoint at 4 that writes steps 5 and 6 again with other losses and goes on to 8 (evaluation at 8)."""
    evals = {"eval/oasst_export/loss": 2.5, "eval/oasst_export/accuracy": 0.4, "eval/OpenAssistant/oasst1/loss": 2.7}
    first = [train_record(1, 4.0), train_record(2, 3.5), {**train_record(3, math.nan), "grad_norm": math.inf},
             train_record(4, 3.0, **evals), train_record(5, 9.0), train_record(6, 9.0)]
    evals_at_8 = {"eval/oasst_export/loss": 2.0, "eval/OpenAssistant/oasst1/loss": 2.2}
    resumed = [train_record(5, 2.8), train_record(6, 2.6), train_record(7, 2.4), train_record(8, 2.2, **evals_at_8)]
    return write_metrics(run_dir, first + resumed)


def by_label(panel) -> dict:
    return {s.label: s for s in panel.series}


def test_series_of_a_resumed_run_with_a_skipped_step(tmp_path: Path) -> None:
    loss, accuracy, lr, speed, grad = curves(read_records(resumed_run(tmp_path) / "metrics.jsonl"))
    train = by_label(loss)["train"]
    assert train.steps.tolist() == list(range(1, 9))
    # Steps 5 and 6 of the first attempt (9.0) were replaced by the resumed run's lines; step 3 stays a gap.
    np.testing.assert_array_equal(train.values, [4.0, 3.5, np.nan, 3.0, 2.8, 2.6, 2.4, 2.2])
    assert list(by_label(loss)) == ["train", "eval OpenAssistant/oasst1", "eval oasst_export"]
    for label, values in (("eval oasst_export", [2.5, 2.0]), ("eval OpenAssistant/oasst1", [2.7, 2.2])):
        series = by_label(loss)[label]
        assert series.steps.tolist() == [4, 8] and series.values.tolist() == values and series.marked
    assert not train.marked
    assert [s.label for s in accuracy.series] == ["train", "eval OpenAssistant/oasst1", "eval oasst_export"]
    assert by_label(accuracy)["eval oasst_export"].values.tolist() == [0.4]
    np.testing.assert_allclose(lr.series[0].values, np.arange(1, 9) * 1e-5)
    assert speed.series[0].values.tolist() == [100.0 * s for s in range(1, 9)]
    # An infinite grad norm becomes a gap as well: kept as inf it would stretch the y-axis to nothing.
    assert np.isnan(grad.series[0].values[2]) and np.isfinite(np.delete(grad.series[0].values, 2)).all()


def test_skipped_step_is_marked_in_the_figure(tmp_path: Path) -> None:
    fig = draw(curves(read_records(resumed_run(tmp_path) / "metrics.jsonl")), "run")
    loss_axes, _, _, _, grad_axes = fig.axes
    for ax, label in ((loss_axes, "train: not finite"), (grad_axes, "grad norm: not finite")):
        [mark] = [line for line in ax.get_lines() if line.get_label() == label]
        assert mark.get_xdata().tolist() == [3]
    assert [t.get_text() for t in loss_axes.get_legend().get_texts()][:2] == ["train", "train: not finite"]


def test_png_of_a_resumed_run(tmp_path: Path) -> None:
    run = resumed_run(tmp_path / "run")
    assert plot_run(run) == run / CURVES
    assert (run / CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(run / CURVES)
    assert image.shape == PNG_SHAPE
    assert image[..., :3].std() > 0.1  # not a blank canvas


def test_one_step_without_eval_or_grad_norm_still_plots(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", [{**train_record(1, 4.0), "grad_norm": None}])
    loss, _, _, _, grad = curves(read_records(run / "metrics.jsonl"))
    assert [s.label for s in loss.series] == ["train"] and loss.series[0].values.tolist() == [4.0]
    assert len(grad.series[0].steps) == 0  # a null grad norm is no point, not a skipped step
    out = tmp_path / "elsewhere.png"
    assert plot_run(run, out) == out and not (run / CURVES).exists()
    assert imread(out).shape == PNG_SHAPE
    fig = draw([loss, grad], "run")
    assert fig.axes[0].get_lines()[0].get_marker() == "o"  # a line through one point alone draws nothing
    assert [t.get_text() for t in fig.axes[1].texts] == ["not recorded"]


def test_command_prints_the_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = resumed_run(tmp_path / "run")
    assert main([str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'curves.png'}\n"
    assert imread(tmp_path / "curves.png").shape == PNG_SHAPE


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, r"cannot read \S+/metrics\.jsonl: No such file or directory"),
        ("", r"\S+/metrics\.jsonl holds no metrics records"),
        ("\n\n", r"\S+/metrics\.jsonl holds no metrics records"),
        ('{"step": 1, "loss": 2.0}\n{"step": 2, "lo', r"\S+/metrics\.jsonl:2: not a metrics record with a step"),
        ('{"loss": 2.0}\n', r"\S+/metrics\.jsonl:1: not a metrics record with a step"),
    ],
    ids=["missing", "empty", "blank-lines", "cut-short", "no-step"],
)
def test_command_refuses_a_folder_without_metrics(tmp_path: Path, content: str | None, expected: str) -> None:
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "model_training.training.plot", str(tmp_path)],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("error: ") and re.search(expected, line), line
    assert not (tmp_path / CURVES).exists()


def test_plot_error_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no metrics records"):
        plot_run(write_metrics(tmp_path, []))


def test_metrics_and_plot_modules_do_not_import_matplotlib() -> None:
    # The trainer imports both; matplotlib (about a second) is paid only when the figure is drawn.
    code = "import sys, model_training.training.metrics; print(any(m.startswith('matplotlib') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_only_the_main_rank_plots_and_a_failed_plot_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [])
    with caplog.at_level(logging.WARNING, logger="model_training.training.metrics"):
        MetricsLogger(cfg, tmp_path, enabled=True).plot_curves(step=0)  # no metrics.jsonl: nothing to plot
    assert "could not plot" in caplog.text and "metrics.jsonl" in caplog.text
    resumed_run(tmp_path)
    MetricsLogger(cfg, tmp_path, enabled=False).plot_curves(step=8)  # any rank but 0
    assert not (tmp_path / CURVES).exists()


def test_curves_reach_wandb_as_an_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [parse_override(o) for o in (f"log_dir={tmp_path / 'logs'}", "log_wandb=true")]
    logger = MetricsLogger(load_config(["defaults", "tiny-falcon", "oasst-sample"], overrides), tmp_path, enabled=True)
    for step in (1, 2):
        logger.log(train_record(step, 3.0))
    logger.plot_curves(step=2)
    # Where wandb keeps this run (older releases keep the folder of an earlier run of the same process).
    files = Path(logger.wandb_run.dir)
    logger.close()
    assert imread(tmp_path / CURVES).shape == PNG_SHAPE
    assert list(files.parent.glob("run-*.wandb"))
    # wandb copies a logged image into the run's media folder.
    assert list(files.glob("media/images/training_curves_*.png"))


@pytest.mark.slow
def test_finished_run_writes_its_curves(zero2_run: Path) -> None:
    # The session fixture trained through trainer_sft.py of this checkout: rank 0 plotted at the end.
    assert imread(zero2_run / CURVES).shape == PNG_SHAPE
    loss = curves(read_records(zero2_run / "metrics.jsonl"))[0]
    assert by_label(loss)["train"].steps.tolist() == list(range(1, 9))
    assert by_label(loss)["eval oasst_export"].steps.tolist() == [4, 8]
    assert (zero2_run / CURVES).stat().st_mtime >= (zero2_run / "metrics.jsonl").stat().st_mtime


def stage_records(
    metrics: tuple[str, ...], eval_metrics: tuple[str, ...], steps: int = 6, **common: float
) -> list[dict]:
    """Records with a stage's step metrics (the names its module logs) every step and its validation metrics at the
    last, as the trainers write them; the values grow with the step, some small (a learning rate) and some large."""
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, **{m: 0.1 * step for m in metrics}, **{k: v * step for k, v in common.items()}}
        if step == steps:
            record.update({f"eval/oasst_export/{m}": 0.05 * step for m in eval_metrics})
        records.append(record)
    return records


COMMON = {"lr": 1e-5, "tokens_per_s": 12000.0, "grad_norm": 1.0}
STAGE_FIGURES = {
    # stage: (its records, then each panel as (title, y label) in order)
    "sft": (stage_records(("loss", "accuracy"), ("loss", "accuracy"), **COMMON), [
        ("loss", "cross-entropy per supervised token"), ("next-token accuracy", "share of supervised tokens"),
        ("learning rate", "learning rate"), ("tokens/s", "tokens/s, all ranks"),
        ("grad norm", "L2 norm of the gradient"),
    ]),
    "rm": (stage_records(RM_METRICS, RM_METRICS, **COMMON), [
        ("loss", "-log sigmoid(margin) per pair"), ("accuracy", "share of pairs ranked right"),
        ("margin", "reward better - reward worse"), ("learning rate", "learning rate"),
        ("tokens/s", "tokens/s, all ranks"), ("grad norm", "L2 norm of the gradient"),
    ]),
    "dpo": (stage_records(DPO_METRICS, DPO_METRICS, **COMMON), [
        ("loss", "DPO loss per pair"), ("accuracy", "share of pairs, chosen above rejected"),
        ("margin", "implicit reward chosen - rejected"), ("implicit rewards", "beta log(pi / pi_ref), summed"),
        ("log-probabilities", "log pi of the reply, summed"), ("learning rate", "learning rate"),
        ("tokens/s", "tokens/s, all ranks"), ("grad norm", "L2 norm of the gradient"),
    ]),
    "rl": (stage_records(PPO_METRICS, (), lr=1e-6, value_lr=2e-6, rollout_tokens_per_s=900.0,
                         train_tokens_per_s=25000.0), [
        ("reward", "reward model's score, mean"), ("KL to the reference", "log pi - log pi_ref, summed"),
        ("entropy", "nats per token"), ("length", "tokens per continuation"), ("policy loss", "clipped surrogate"),
        ("value loss", "clipped value loss"), ("clip fractions", "share of tokens clipped"),
        ("learning rates", "learning rate"), ("tokens/s", "tokens/s, all ranks"),
    ]),
    "grpo": (stage_records(GRPO_METRICS, (), lr=1e-6, rollout_tokens_per_s=900.0, train_tokens_per_s=25000.0,
                           **{"reward/exact_answer": 0.5}), [
        ("reward", "mean per continuation"), ("groups", "reward std within a group; share"),
        ("KL to the reference", "k3 estimate per token"), ("entropy", "nats per token"),
        ("length", "tokens per continuation"), ("policy loss", "clipped surrogate (+ KL term)"),
        ("clip fractions", "share of tokens clipped"), ("learning rate", "learning rate"),
        ("tokens/s", "tokens/s, all ranks"),
    ]),
}  # fmt: skip


@pytest.mark.parametrize("stage", list(STAGE_FIGURES))
def test_each_stage_plots_its_own_metrics_with_labelled_axes_and_plain_numbers(stage: str, tmp_path: Path) -> None:
    records, expected = STAGE_FIGURES[stage]
    run = write_metrics(tmp_path / "run", records)
    assert stage_of(read_records(run / "metrics.jsonl")) == stage
    plot_run(run)
    fig = draw(curves(read_records(run / "metrics.jsonl")), "run")
    fig.canvas.draw()  # the tick labels and offsets exist once drawn
    assert [(ax.get_title(), ax.get_ylabel()) for ax in fig.axes] == expected
    for ax in fig.axes:
        assert not ax.texts, f"{ax.get_title()}: not recorded"  # every panel has its metric in the records
        assert ax.get_lines(), ax.get_title()
        # No offset or power of ten written apart from the ticks (a learning rate's "1e-5" at the axis' top).
        assert ax.yaxis.get_offset_text().get_text() == "" and ax.xaxis.get_offset_text().get_text() == ""
        assert all(label.get_text() for label in ax.get_yticklabels())
    bottom = {ax.get_xlabel() for ax in fig.axes} - {""}
    assert bottom == {"optimizer step"}
    # The last row of panels carries the step axis; three to a row when there are more than four.
    assert sum(bool(ax.get_xlabel()) for ax in fig.axes) == min(3, len(expected))
    rows = -(-len(expected) // 3)
    assert imread(run / CURVES).shape == (400 * rows, 1200, 4)


def test_panels_with_metrics_in_the_evaluations_only() -> None:
    """A stage's train-side metric missing (an old run) leaves the validation sets' points, and the title stays."""
    records = [{k: v for k, v in r.items() if k != "accuracy"} for r in STAGE_FIGURES["rm"][0]]
    accuracy = curves(records)[1]
    assert accuracy.title == "accuracy" and len(by_label(accuracy)["train"].steps) == 0
    assert by_label(accuracy)["eval oasst_export"].steps.tolist() == [6]
