"""Warmup then cosine / linear / constant decay."""

from __future__ import annotations

import math

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR

from model_training.training.schedule import build_scheduler, lr_multiplier

CARD_END = 0.1
"""The RLHF Falcon-40B card's end of its cosine: 1.85e-7 of a 1.85e-6 peak."""


def test_warmup_rises_linearly_to_the_peak() -> None:
    assert [lr_multiplier(s, 4, 20, "cosine") for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_multiplier(4, 4, 20, "cosine") == 1.0


@pytest.mark.parametrize(
    ("kind", "min_ratio", "end"),
    [("cosine", 0.0, 0.0), ("cosine", 0.25, 0.25), ("linear", 0.0, 0.0), ("linear", 0.25, 0.25),
     ("constant", 0.25, 1.0)],
)
def test_decay_kinds_end_where_documented(kind: str, min_ratio: float, end: float) -> None:
    """Cosine and linear end at `min_ratio` (by default 0, as transformers' schedules); constant does not decay."""
    values = [lr_multiplier(s, 2, 12, kind, min_ratio=min_ratio) for s in range(2, 13)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(end, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_a_decay_of_its_own_length_then_holds_its_end() -> None:
    """The RLHF Falcon-40B card's schedule: 10 warmup steps, a cosine over 100 steps to 10% of the peak, held to
    the run's 200th step."""
    values = [lr_multiplier(s, 10, 200, "cosine", decay_steps=100, min_ratio=CARD_END) for s in range(200)]
    assert values[9] < values[10] == 1.0
    assert values[60] == pytest.approx(CARD_END + (1 - CARD_END) / 2)
    assert values[110:] == [pytest.approx(CARD_END)] * 90


def test_cosine_midpoint() -> None:
    assert lr_multiplier(7, 2, 12, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(7, 2, 12, "cosine", min_ratio=CARD_END) == pytest.approx(CARD_END + (1 - CARD_END) / 2)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown lr_scheduler_type 'step'"):
        lr_multiplier(5, 0, 10, "step")


def test_scheduler_drives_the_optimizer() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=3, kind="linear")
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.25])


@pytest.mark.parametrize(("warmup", "total"), [(20, 100), (1, 10), (0, 7), (5, 5), (3, 40)])
def test_warmup_decay_is_deepspeeds_warmup_decay_lr_as_openassistant_configured_it(warmup: int, total: int) -> None:
    """The rate of every update equals what DeepSpeed's own WarmupDecayLR (its default log warmup) sets, with
    the values the OpenAssistant trainer's "auto" gave it: min 0, max the learning rate, our warmup and total."""
    peak = 1e-5
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    deepspeed_scheduler = WarmupDecayLR(theirs, total_num_steps=total, warmup_min_lr=0.0, warmup_max_lr=peak,
                                        warmup_num_steps=max(warmup, 1))
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_scheduler(ours, warmup_steps=warmup, total_steps=total, kind="warmup_decay")
    for _ in range(total + 2):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12, abs=1e-20)
        for optimizer, steps in ((theirs, deepspeed_scheduler), (ours, scheduler)):
            optimizer.step()
            steps.step()


def test_warmup_decay_starts_at_0_peaks_after_the_warmup_and_decays_linearly() -> None:
    rates = [lr_multiplier(s, 20, 100, "warmup_decay") for s in range(102)]
    assert rates[:2] == [0.0, 0.0] and rates[2] == pytest.approx(math.log(2) / math.log(20))
    assert rates[21] == 1.0 and rates[61] == pytest.approx(0.5)
    # DeepSpeed's position before the last update (step 99) is 98: the run ends at 2/80 of the peak, 0 after it.
    assert rates[99] == pytest.approx(2 / 80) and rates[101] == 0.0
    assert all(a <= b for a, b in zip(rates[:22], rates[1:22])) and all(a >= b for a, b in zip(rates[21:], rates[22:]))
