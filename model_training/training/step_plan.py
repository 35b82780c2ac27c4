"""Which training samples each rank reads at each optimizer step: a seeded mixture, deterministic, resumable.

Each epoch draws its samples from every source (`SourceDraw`: all of them, a fraction, a fixed number, with
or without replacement; a different draw each epoch), shuffles them together with a seeded permutation and
cuts the result into global batches of world_size x micro_batch x accumulation samples. An optimizer step
consumes one global batch; it is split into `world_size` contiguous parts by *global* rank, so across all
nodes every drawn sample is read by exactly one rank, and the samples of a step do not depend on how the
step is split between ranks and accumulation. The last step of an epoch may be short: its samples are
spread as evenly as possible and a rank left with an empty micro-batch runs one that carries no loss (ZeRO
needs every rank in every forward and backward). The position in the data is a pure function of the step and of
where the plan starts (`DataPosition`): a run starts at sample 0 of epoch 0; a resume whose global batch differs from
its checkpoint's starts at the sample where the checkpoint's steps stopped reading, so that the samples already read
stay read, and cuts the rest of that epoch, then every later one, into global batches of its own size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from model_training.config import ConfigError


@dataclass(frozen=True)
class SourceDraw:
    """One source's samples in the pool (`offset`, `length`) and how many an epoch draws (`per_epoch`)."""

    offset: int
    length: int
    per_epoch: int
    replace: bool = False


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + key) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


SORT_RUN = 200
"""With `sort_by_length`, the epoch's samples sorted by length are shuffled within runs of this many, as
OpenAssistant's sampler does: micro-batches of like lengths, in an order that still changes every epoch."""


@dataclass(frozen=True)
class DataPosition:
    """Where optimizer step `step` (0-based, over all epochs) starts reading: sample `offset` of epoch `epoch`'s
    order."""

    step: int = 0
    epoch: int = 0
    offset: int = 0


@dataclass(frozen=True)
class StepPlace:
    """The samples of one optimizer step, all ranks together: `count` of epoch `epoch`'s order from `first` on."""

    epoch: int
    first: int
    count: int


@dataclass(frozen=True)
class StepPlan:
    sources: tuple[SourceDraw, ...]
    world_size: int
    rank: int
    micro_batch_size: int
    accumulation_steps: int
    seed: int
    lengths: tuple[int, ...] | None = None
    """With `sort_by_length`: each pool sample's length as it trains (capped at max_length)."""
    start: DataPosition = DataPosition()
    """Where the plan's first step reads (a resume with another global batch starts mid-epoch)."""

    @property
    def samples_per_step(self) -> int:
        return self.world_size * self.micro_batch_size * self.accumulation_steps

    @property
    def samples_per_epoch(self) -> int:
        return sum(s.per_epoch for s in self.sources)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.samples_per_epoch / self.samples_per_step)

    def epoch_order(self, epoch: int) -> list[int]:
        """Pool indices of the epoch's samples, in reading order."""
        drawn: list[int] = []
        for index, source in enumerate(self.sources):
            generator = _generator(self.seed, epoch, index + 1)
            if source.replace:
                picks = torch.randint(source.length, (source.per_epoch,), generator=generator)
            else:
                picks = torch.randperm(source.length, generator=generator)[: source.per_epoch]
            drawn.extend(source.offset + int(i) for i in picks)
        generator = _generator(self.seed, epoch, 0)
        order = torch.randperm(len(drawn), generator=generator)
        shuffled = [drawn[i] for i in order]
        if self.lengths is None:
            return shuffled
        # A stable sort of the shuffled draw: ties keep a random order.
        by_length = sorted(shuffled, key=lambda i: self.lengths[i])
        runs = [by_length[start : start + SORT_RUN] for start in range(0, len(by_length), SORT_RUN)]
        return [run[int(i)] for run in runs for i in torch.randperm(len(run), generator=generator)]

    def locate(self, step: int) -> StepPlace:
        """Which samples optimizer step `step` (0-based, over all epochs; not before `start.step`) reads: the rest of
        the start's epoch in global batches, then every later epoch from its first sample (a short last step each)."""
        batch, count, start = self.samples_per_step, self.samples_per_epoch, self.start
        k = step - start.step
        if k < 0:
            raise ValueError(f"step {step} comes before the plan's start at step {start.step}")
        rest_of_epoch = math.ceil((count - start.offset) / batch)
        if k < rest_of_epoch:
            epoch, first = start.epoch, start.offset + k * batch
        else:
            k -= rest_of_epoch
            epoch, first = start.epoch + 1 + k // self.steps_per_epoch, (k % self.steps_per_epoch) * batch
        return StepPlace(epoch, first, min(batch, count - first))

    def position(self, step: int) -> DataPosition:
        """Where step `step` starts reading (after `step` steps): what a checkpoint saves of the data position."""
        place = self.locate(step)
        return DataPosition(step, place.epoch, place.first)

    def step_samples(self, order: list[int], step: int) -> list[int]:
        """Every sample of optimizer step `step`, all ranks together (for counting supervised tokens); `order` is the
        order of its epoch (`locate(step).epoch`)."""
        place = self.locate(step)
        return order[place.first : place.first + place.count]

    def micro_batches(self, order: list[int], step: int) -> list[list[int]]:
        """This rank's `accumulation_steps` micro-batches of one step; some may be empty in a short last step."""
        mine = _even_parts(self.step_samples(order, step), self.world_size)[self.rank]
        return _even_parts(mine, self.accumulation_steps)


def _even_parts(items: list[int], parts: int) -> list[list[int]]:
    """Contiguous parts whose sizes differ by at most one, larger first (equal parts for a full step)."""
    size, extra = divmod(len(items), parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + size + (p < extra))
    return [items[bounds[p] : bounds[p + 1]] for p in range(parts)]


def plan_sources(names: list[str], lengths: list[int], options: list[Any]) -> tuple[SourceDraw, ...]:
    """Each dataset's draw per epoch from its options: `size`, `fraction` or `share` of the epoch, else all.

    A `share` is of the whole epoch: with the other datasets drawing N samples, shares s_i add
    round(s_i * N / (1 - sum of shares)) each, so "5% pretraining text" stays 5% whatever the chat data's size.
    Asking for more samples than a dataset has is an error unless it sets `replace`.
    """
    per_epoch: list[int | None] = []
    for length, opts in zip(lengths, options):
        if opts.size is not None:
            per_epoch.append(opts.size)
        elif opts.fraction is not None:
            per_epoch.append(max(1, round(opts.fraction * length)))
        elif opts.share is not None:
            per_epoch.append(None)
        else:
            per_epoch.append(length)
    shares = [opts.share for opts in options if opts.share is not None]
    if shares:
        rest = sum(n for n in per_epoch if n is not None)
        if rest == 0 or sum(shares) >= 1.0:
            raise ConfigError(
                f"dataset shares {shares} need other datasets to be a share of, and must add up to less than 1"
            )
        scale = rest / (1.0 - sum(shares))
        per_epoch = [round(o.share * scale) if n is None else n for n, o in zip(per_epoch, options)]
    draws, offset = [], 0
    for name, length, opts, n in zip(names, lengths, options, per_epoch):
        if n > length and not opts.replace:
            raise ConfigError(
                f"dataset '{name}' is asked for {n} samples per epoch but has {length} after its filters; "
                "set 'replace: true' to draw with replacement, or ask for fewer"
            )
        draws.append(SourceDraw(offset=offset, length=length, per_epoch=n, replace=opts.replace))
        offset += length
    return tuple(draws)
