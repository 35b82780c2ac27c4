"""Learning-rate schedule: linear warmup from 0 to the peak, then cosine, linear or constant decay."""

from __future__ import annotations

import math

import torch

COSINE_FLOOR = 0.1
"""Cosine decays to this fraction of the peak rather than to 0, so the last steps still learn."""


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate for the update made at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type '{kind}'")


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    # DeepSpeed steps it once per applied optimizer step and saves/loads its state with the checkpoint.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, kind)
    )
