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
from model_training.training.plot import curves, draw, main, plot_run, read_records

PNG_SHAPE = (800, 1200, 4)  # FIGSIZE x DPI, RGBA


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
    loss, lr, speed, grad = curves(read_records(resumed_run(tmp_path) / "metrics.jsonl"))
    train = by_label(loss)["train"]
    assert train.steps.tolist() == list(range(1, 9))
    # Steps 5 and 6 of the first attempt (9.0) were replaced by the resumed run's lines; step 3 stays a gap.
    np.testing.assert_array_equal(train.values, [4.0, 3.5, np.nan, 3.0, 2.8, 2.6, 2.4, 2.2])
    assert list(by_label(loss)) == ["train", "eval OpenAssistant/oasst1", "eval oasst_export"]
    for label, values in (("eval oasst_export", [2.5, 2.0]), ("eval OpenAssistant/oasst1", [2.7, 2.2])):
        series = by_label(loss)[label]
        assert series.steps.tolist() == [4, 8] and series.values.tolist() == values and series.marked
    assert not train.marked
    np.testing.assert_allclose(lr.series[0].values, np.arange(1, 9) * 1e-5)
    assert speed.series[0].values.tolist() == [100.0 * s for s in range(1, 9)]
    # An infinite grad norm becomes a gap as well: kept as inf it would stretch the y-axis to nothing.
    assert np.isnan(grad.series[0].values[2]) and np.isfinite(np.delete(grad.series[0].values, 2)).all()


def test_skipped_step_is_marked_in_the_figure(tmp_path: Path) -> None:
    fig = draw(curves(read_records(resumed_run(tmp_path) / "metrics.jsonl")), "run")
    loss_axes, _, _, grad_axes = fig.axes
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
    loss, _, _, grad = curves(read_records(run / "metrics.jsonl"))
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
