"""Learning-rate schedules: each a multiplier of the peak learning rate for every optimizer step.

- `warmup_decay` (the default): DeepSpeed's `WarmupDecayLR` exactly as the OpenAssistant trainer ran it
  (its configs/zero_config.json, with DeepSpeed's default logarithmic warmup): 0 for the first two updates,
  then log(k) / log(W) up to the peak over W = max(2, warmup_steps) updates, then a linear decay (the last
  update of a run gets 2 / (total_steps - W) of the peak; DeepSpeed's curve reaches 0 just after it).
- `cosine`, `linear`, `constant`: a linear warmup from 0 to the peak over `warmup_steps`, then a cosine or a
  linear decay to `min_ratio` of the peak (0 by default, as transformers' schedules that the OpenAssistant trainer
  ran), or none; the decay lasts until the last step, or `decay_steps` steps and then stays at its end (the RLHF
  Falcon-40B card: cosine over 100 of its 200 steps, to 10% of the peak).
"""

from __future__ import annotations

import math

import torch

KINDS = ("warmup_decay", "cosine", "linear", "constant")


def lr_multiplier(
    step: int, warmup_steps: int, total_steps: int, kind: str, decay_steps: int | None = None, min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate for the update made at optimizer step `step` (0-based); a decay ends at
    `min_ratio`."""
    if kind == "warmup_decay":
        return _deepspeed_warmup_decay(step, warmup_steps, total_steps)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, decay_steps or total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type '{kind}'")


def _deepspeed_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """WarmupDecayLR(warmup_min_lr=0, warmup_num_steps=warmup_steps, total_num_steps=total_steps, log warmup).

    DeepSpeed sets the rate of an update from the scheduler's position before it: -1 before the first update
    (the minimum, 0), then i = step - 1. It clamps the warmup to at least 2 steps.
    """
    if step == 0:
        return 0.0
    position, warmup = step - 1, max(2, warmup_steps)
    if position < warmup:
        return math.log(position + 1) / math.log(warmup)
    return max(0.0, (total_steps - position) / max(1.0, total_steps - warmup))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    kind: str,
    decay_steps: int | None = None,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    # DeepSpeed steps it once per applied optimizer step and saves/loads its state with the checkpoint.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, kind, decay_steps, min_ratio)
    )
