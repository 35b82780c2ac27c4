"""Warmup then cosine / linear / constant decay."""

from __future__ import annotations

import pytest
import torch

from model_training.training.schedule import COSINE_FLOOR, build_scheduler, lr_multiplier


def test_warmup_rises_linearly_to_the_peak() -> None:
    assert [lr_multiplier(s, 4, 20, "cosine") for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_multiplier(4, 4, 20, "cosine") == 1.0


@pytest.mark.parametrize(("kind", "end"), [("cosine", COSINE_FLOOR), ("linear", 0.0), ("constant", 1.0)])
def test_decay_kinds_end_where_documented(kind: str, end: float) -> None:
    values = [lr_multiplier(s, 2, 12, kind) for s in range(2, 13)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(end)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_midpoint() -> None:
    assert lr_multiplier(7, 2, 12, "cosine") == pytest.approx(COSINE_FLOOR + (1 - COSINE_FLOOR) / 2)


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
