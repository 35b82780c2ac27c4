"""Which training samples each rank reads at each optimizer step: deterministic, seeded, resumable.

Each epoch is one seeded permutation of all training samples, cut into global batches of
world_size x micro_batch x accumulation samples; an optimizer step consumes one global batch, rank r takes
its r-th slice and splits it into micro-batches. So the samples of a step do not depend on how the step is
split between ranks and accumulation, and the position in the data is a pure function of the step count.
The last partial global batch of an epoch is dropped (different samples each epoch, since the order changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    num_samples: int
    world_size: int
    rank: int
    micro_batch_size: int
    accumulation_steps: int
    seed: int

    @property
    def samples_per_step(self) -> int:
        return self.world_size * self.micro_batch_size * self.accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.samples_per_step

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def micro_batches(self, order: list[int], step_in_epoch: int) -> list[list[int]]:
        """This rank's micro-batches (sample indices) for one optimizer step of the epoch `order` comes from."""
        per_rank = self.micro_batch_size * self.accumulation_steps
        start = step_in_epoch * self.samples_per_step + self.rank * per_rank
        mine = order[start : start + per_rank]
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]

    def global_step_samples(self, order: list[int], step_in_epoch: int) -> list[int]:
        """Every sample of one optimizer step, all ranks together (for counting supervised tokens)."""
        start = step_in_epoch * self.samples_per_step
        return order[start : start + self.samples_per_step]
