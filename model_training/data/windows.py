"""What of each sample a step trains on: the length limit, OpenAssistant's long-sample rule, its system prefix.

Samples are tokenized whole; the cut is made when a batch is built. A sample longer than the limit trains, with
probability `random_offset_probability`, on a window at an offset drawn uniformly from every position it can
start at, else on its first tokens (OpenAssistant's collator does the same with a fresh draw each time it sees
a sample). Here the draw is a pure function of (seed, epoch, sample), so a run and its resume cut every sample
alike, and evaluation (epoch -1) sees the same windows every time. A system prefix (`use_system_prefix`) goes
before the window and does not count against the cut, as in OpenAssistant's collator.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from model_training.data.formatting import IGNORE_INDEX, FormattedSample

EVALUATION = -1
"""The epoch of validation samples' windows: the same at every evaluation."""


@dataclass(frozen=True)
class LengthRule:
    """How a sample is cut to `max_length` tokens (the prefix included)."""

    max_length: int
    random_offset_probability: float = 0.0
    seed: int = 0
    prefix: FormattedSample | None = None

    def __post_init__(self) -> None:
        room = self.max_length - (len(self.prefix.input_ids) if self.prefix else 0)
        if room < 1:
            raise ValueError(f"the system prefix leaves no room for the conversation in {self.max_length} tokens")

    def apply(self, sample: FormattedSample, epoch: int, index: int) -> FormattedSample:
        """The part of `sample` (number `index` of its pool) that trains in `epoch`."""
        prefix_length = len(self.prefix.input_ids) if self.prefix else 0
        room = self.max_length - prefix_length
        length = len(sample.input_ids)
        if length > room:
            draw = random.Random(_key(self.seed, epoch, index))
            offset = draw.randint(0, length - room) if draw.random() < self.random_offset_probability else 0
            # labels[t] is the target of position t - 1: the window's first label would be predicted from a
            # token outside it.
            labels = (IGNORE_INDEX, *sample.labels[offset + 1 : offset + room]) if offset else sample.labels[:room]
            sample = FormattedSample(sample.input_ids[offset : offset + room], labels, truncated=True)
        if self.prefix is None:
            return sample
        return FormattedSample(self.prefix.input_ids + sample.input_ids, self.prefix.labels + sample.labels,
                               sample.truncated)

    def fingerprint(self) -> tuple:
        """What of the rule changes which tokens train (for the data fingerprint a resume compares)."""
        prefix = None if self.prefix is None else self.prefix.input_ids
        return self.max_length, self.random_offset_probability, self.seed, prefix


@dataclass(frozen=True)
class WholeSamples:
    """The rule for samples cut when they were formatted (the preference stages' groups): each trains whole."""

    def apply(self, sample: Any, epoch: int, index: int) -> Any:
        return sample

    def fingerprint(self) -> tuple:
        return ("whole",)


def _key(seed: int, epoch: int, index: int) -> int:
    """A seed for one (epoch, sample), independent of Python's hash randomization."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "big")
