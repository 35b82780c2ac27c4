"""The counters of TrainerState that the loop keeps: steps, tokens, and non-finite losses in a row."""

from __future__ import annotations

import math

import pytest

from model_training.training.step import TrainingError
from model_training.training.trainer import TrainerState

NAN = math.nan


def test_a_step_counts_its_micro_batches_and_tokens() -> None:
    state = TrainerState()
    state.count_step(micro_batches=4, tokens=300)
    state.count_step(micro_batches=4, tokens=200)
    assert (state.optimizer_step, state.micro_step, state.tokens_seen) == (2, 8, 500)


def test_nonfinite_losses_are_counted_and_a_finite_one_ends_the_row(caplog: pytest.LogCaptureFixture) -> None:
    state = TrainerState()
    assert state.count_nonfinite([(1, [2.5, 0.5]), (2, [NAN, 0.4]), (3, [math.inf, 0.3])], max_in_row=3) == [
        math.inf, 0.3]
    assert (state.skipped_steps, state.nonfinite_in_row) == (2, 2)
    assert "non-finite loss at optimizer step 3" in caplog.text
    assert state.count_nonfinite([(4, [2.0, 0.6])], max_in_row=3) == [2.0, 0.6]
    assert (state.skipped_steps, state.nonfinite_in_row) == (2, 0)


def test_too_many_nonfinite_losses_in_a_row_stop_training() -> None:
    state = TrainerState(nonfinite_in_row=1, skipped_steps=1)  # a row a resume carries on
    with pytest.raises(TrainingError, match="2 optimizer steps in a row with a non-finite loss, the last at step 7"):
        state.count_nonfinite([(7, [NAN]), (8, [1.0])], max_in_row=2)
