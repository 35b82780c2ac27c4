"""Evaluation on the validation sets: loss and next-token accuracy on their supervised tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model_training.data.formatting import FormattedSample
from model_training.data.registry import TokenizedSplit
from model_training.data.windows import EVALUATION, LengthRule
from model_training.training import loss
from model_training.training.batches import BatchSpec


@dataclass(frozen=True)
class Evaluator:
    """Loss and next-token accuracy on supervised tokens of each validation set, in a fixed order.

    Each set is its first `size` samples (all of them with None), each cut by `rule`, alike at every evaluation.
    Rank r takes samples r, r + world, ...; every rank runs the same number of batches (a rank short of samples
    runs one more batch and does not count it), since ZeRO-3 forwards are collective.
    """

    splits: list[TokenizedSplit]
    rule: LengthRule
    size: int | None
    batch_size: int
    spec: BatchSpec
    rank: int
    world_size: int

    @torch.no_grad()
    def __call__(self, engine: Any) -> dict[str, float]:
        """`eval/<set>/loss` and `eval/<set>/accuracy` of every non-empty set; `engine` is left in training mode."""
        engine.eval()
        results: dict[str, float] = {}
        for split in self.splits:
            samples = [self.rule.apply(s, EVALUATION, j) for j, s in enumerate(split.samples[: self.size])]
            if not samples:
                continue
            loss_sum, correct, supervised = self._sums(engine, samples)
            results[f"eval/{split.name}/loss"] = (loss_sum / supervised).item()
            results[f"eval/{split.name}/accuracy"] = (correct / supervised).item()
        engine.train()
        return results

    def _sums(self, engine: Any, samples: list[FormattedSample]) -> torch.Tensor:
        """(summed token losses, correct predictions, supervised tokens) of `samples`, all ranks."""
        mine = samples[self.rank :: self.world_size]
        num_batches = math.ceil(math.ceil(len(samples) / self.world_size) / self.batch_size)
        sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
        for b in range(num_batches):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            inputs, labels = self.spec.device_batch(chunk or samples[:1], engine.device)
            loss_sum, correct = loss.token_sums(engine, inputs, labels, self.spec.chunked)
            if chunk:
                supervised = torch.tensor(loss.count_supervised(labels), dtype=torch.float64, device=engine.device)
                sums += torch.stack([loss_sum.double(), correct.double(), supervised])
        dist.all_reduce(sums)
        return sums
