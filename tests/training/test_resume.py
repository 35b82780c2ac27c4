"""What a resume continues from and what it says (model_training/training/resume.py): the schedule's length in
optimizer steps, the data position, and one line for each change; a finished run says it is complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import TINY_RUN, check_ok, run_torchrun, snapshot

from model_training.config import load_config
from model_training.training.resume import Resume, continued_plan, schedule
from model_training.training.step_plan import DataPosition, SourceDraw, StepPlan

PLAN = StepPlan((SourceDraw(0, 100, 100),), world_size=2, rank=0, micro_batch_size=4, accumulation_steps=1, seed=1)
"""100 samples an epoch in steps of 8: 13 steps, the last one short."""


def resumed(saved: dict) -> Resume:
    return Resume(Path("checkpoint-000010"), saved, world_size=2, universal=False)


def test_epochs_count_in_the_global_batch_the_run_started_with() -> None:
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [("num_train_epochs", 2)])
    assert schedule(cfg, PLAN, None).total_steps == 26 == 2 * PLAN.steps_per_epoch
    # Resumed with another global batch (4 samples a step: 25 steps an epoch), the checkpoint's epochs still count.
    smaller = StepPlan(PLAN.sources, 1, 0, 4, 1, seed=1)
    assert schedule(cfg, smaller, resumed({"epoch_steps": 13})).total_steps == 26
    assert schedule(cfg, smaller, resumed({})).total_steps == 50  # a checkpoint from before epoch_steps was saved
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [("max_steps", 7)])
    assert schedule(cfg, smaller, resumed({"epoch_steps": 13})).total_steps == 7


def test_the_data_continues_from_where_the_checkpoint_stopped_reading() -> None:
    saved = {"optimizer_step": 10, "data_epoch": 0, "data_offset": 80}
    assert continued_plan(PLAN, resumed(saved)).start == DataPosition(10, 0, 80)
    assert continued_plan(PLAN, resumed({"optimizer_step": 10})) is PLAN  # saved before positions were


@pytest.mark.slow
def test_a_finished_run_resumed_says_it_is_complete_and_trains_nothing(zero2_run: Path, tmp_path: Path) -> None:
    """The finished 8-step run of 2 ranks resumed (a requeue after the last step, here in a process alone): one line,
    before any engine is built or any conversion for another number of ranks made; nothing written. (Another schedule,
    batch and number of ranks: test_preemption.py's runner test, one launch for all.)"""
    run = Path(shutil.copytree(zero2_run, tmp_path / "run"))
    before = snapshot([run])
    done = check_ok(run_torchrun([*TINY_RUN, f"output_dir={run}", "--resume_from_checkpoint", "auto"], nproc=1))
    assert "already complete at step 8 (its schedule has 8 steps): nothing to train" in done.stdout
    assert "startup: engine init" not in done.stdout
    assert snapshot([run]) == before
