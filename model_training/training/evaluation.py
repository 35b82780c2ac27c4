"""Evaluation on the validation sets: each stage's metrics (SFT: loss and next-token accuracy on the supervised
tokens; the preference stages: training/preference_loss.py)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model_training.data.formatting import IGNORE_INDEX
from model_training.data.windows import EVALUATION, LengthRule, WholeSamples
from model_training.training.batches import SampleSpec


@dataclass(frozen=True)
class Evaluator:
    """The spec's metrics (loss first) per loss unit of each validation set, in a fixed order.

    Each set is its first `size` samples (all of them with None), each cut by `rule`, alike at every evaluation.
    Rank r takes samples r, r + world, ...; every rank runs the same number of batches (a rank short of samples
    runs one more batch and does not count it), since ZeRO-3 forwards are collective.
    """

    splits: list[Any]
    """Each with `name` and `samples` (TokenizedSplit, PreferenceSplit)."""
    rule: LengthRule | WholeSamples
    size: int | None
    batch_size: int
    spec: SampleSpec
    rank: int
    world_size: int

    @torch.no_grad()
    def __call__(self, engine: Any) -> dict[str, float]:
        """`eval/<set>/<metric>` of every non-empty set (SFT: loss, accuracy); `engine` is left in training mode."""
        engine.eval()
        results: dict[str, float] = {}
        for split in self.splits:
            count = len(split.samples) if self.size is None else min(self.size, len(split.samples))
            if not count:
                continue
            # Each sample is read (from its store) and cut when its batch comes: no set is held whole.
            cut = functools.partial(_cut, self.rule, split.samples)
            *sums, units = self._sums(engine, cut, count).tolist()
            results.update({f"eval/{split.name}/{name}": value / units
                            for name, value in zip(self.spec.metrics, sums, strict=True)})
        engine.train()
        return results

    def _sums(self, engine: Any, cut: Callable[[int], Any], count: int) -> torch.Tensor:
        """The metrics' sums of the `count` samples `cut(j)` gives, then their loss units, all ranks."""
        sums = torch.zeros(len(self.spec.metrics) + 1, dtype=torch.float64, device=engine.device)
        for indices in rank_batches(count, self.batch_size, self.rank, self.world_size):
            chunk = [cut(i) for i in indices]
            inputs, targets = self.spec.device_batch(chunk or [cut(0)], engine.device)
            values = self.spec.sums(engine, inputs, targets)
            if chunk:
                units = torch.tensor([self.spec.units(targets)], dtype=torch.float64, device=engine.device)
                sums += torch.cat([values.double(), units])
        dist.all_reduce(sums)
        return sums


def without_supervised_tokens(splits: list[Any], rule: LengthRule, size: int | None) -> str | None:
    """The name of the first validation set whose samples (the first `size`), cut as every evaluation cuts them, hold
    no supervised token, so that its loss would be 0 / 0; None when every set has one. Stops at the first sample
    that has one: the first, mostly."""
    for split in splits:
        count = len(split.samples) if size is None else min(size, len(split.samples))
        # labels[0] is the target of no position (count_supervised)
        if count and not any(label != IGNORE_INDEX for i in range(count)
                             for label in _cut(rule, split.samples, i).labels[1:]):
            return split.name
    return None


def _cut(rule: LengthRule | WholeSamples, samples: Sequence[Any], index: int) -> Any:
    """Validation sample `index` as every evaluation sees it."""
    return rule.apply(samples[index], EVALUATION, index)


def rank_batches(count: int, batch_size: int, rank: int, world_size: int) -> Iterator[list[int]]:
    """The indices of `rank`'s batches of `count` items: rank r takes items r, r + world, ...; every rank gets as
    many batches, the last ones empty on a rank short of items (it runs a stand-in that counts nothing, since ZeRO-3
    forwards are collective)."""
    mine = list(range(rank, count, world_size))
    for b in range(math.ceil(math.ceil(count / world_size) / batch_size)):
        yield mine[b * batch_size : (b + 1) * batch_size]
