"""This process's rank and the number of ranks, and one value gathered from every rank: what a checkpoint's save
(training/checkpoint.py, training/reshard.py) and its verification shared over the ranks (read.py) coordinate with.
Without a process group (export, tests) the process is rank 0 of 1.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def current_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order. Doubles as a barrier: no rank returns before all have called."""
    if current_world_size() == 1:
        return [value]
    values: list[Any] = [None] * current_world_size()
    dist.all_gather_object(values, value)
    return values

