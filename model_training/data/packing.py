"""Padding-free packing: a seeded plan that groups samples into rows of at most `max_tokens`, and the row itself.

A packed row is the samples' tokens laid end to end with no padding. It only trains like the samples one by
one when the model isolates them (each sample attends to itself, rotary positions restart at 0:
`model_training.models.packing`) and when no label crosses a boundary, which `pack_samples` guarantees.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

from model_training.data.formatting import IGNORE_INDEX, FormattedSample

PACKING_WINDOW = 4096
"""Samples packed together at most: large enough to fill rows tightly, small enough that packs keep mixing."""


def plan_packs(
    lengths: Sequence[int], max_tokens: int, seed: int, window: int = PACKING_WINDOW
) -> list[list[int]]:
    """Group sample indices into packs of at most `max_tokens` tokens; the same arguments give the same plan.

    The indices are shuffled with `seed` and cut into windows of `window` samples; each window is packed by
    best-fit decreasing (longest first, each into the fullest pack it still fits), and the packs of all
    windows are shuffled together. Windows keep the packs' contents random from one seed to the next, which
    one global sort would not; best-fit keeps them nearly full. Every index appears exactly once.

    Unused capacity, 1 - tokens / (packs * max_tokens), measured on 20,000 log-normal lengths (median 300,
    sigma 1, clipped to 16..2048, mean 463): 0.23% at max_tokens 8192 (0.85% with window 1024, 3.2% with
    256; greedy next-fit in shuffled order: 5.3%) and 0.08% at max_tokens 2048 (next-fit: 18.7%). Padding
    every sample to 2048 instead would waste 77%. Planning 200,000 samples takes about half a second.

    Raises ValueError for a sample with fewer than 1 or more than `max_tokens` tokens, naming its index.
    """
    if max_tokens < 1 or window < 1:
        raise ValueError(f"max_tokens and window must be positive, got {max_tokens} and {window}")
    for index, length in enumerate(lengths):
        if not 1 <= length <= max_tokens:
            raise ValueError(f"sample {index} has {length} tokens; a pack holds 1 to max_tokens={max_tokens}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    packs: list[list[int]] = []
    for start in range(0, len(order), window):
        packs.extend(_best_fit_decreasing(order[start : start + window], lengths, max_tokens))
    rng.shuffle(packs)
    return packs


def _best_fit_decreasing(indices: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Packs of `indices`, longest sample first, each into the open pack with the least room that fits it."""
    packs: list[list[int]] = []
    # (room left, pack number), sorted: bisect finds the tightest pack with room >= length.
    rooms: list[tuple[int, int]] = []
    # A stable sort on the shuffled order: equal lengths keep the seed's order, so ties are seeded too.
    for index in sorted(indices, key=lambda i: lengths[i], reverse=True):
        length = lengths[index]
        slot = bisect.bisect_left(rooms, (length, -1))
        if slot == len(rooms):
            packs.append([index])
            bisect.insort(rooms, (max_tokens - length, len(packs) - 1))
        else:
            room, pack = rooms.pop(slot)
            packs[pack].append(index)
            bisect.insort(rooms, (room - length, pack))
    return packs


def pack_samples(samples: Sequence[FormattedSample]) -> dict[str, torch.Tensor | int]:
    """One padding-free row of `samples`: `input_ids`, `labels`, `position_ids`, `cu_seq_lens`, `max_length`.

    `input_ids`, `labels` and `position_ids` are long tensors of shape (1, total tokens). Each sample's first
    label is IGNORE_INDEX: labels[t] is the target of position t - 1 (Hugging Face's alignment), and the
    position before a sample's first token is the previous sample's last one, which must not learn to
    predict an unrelated conversation. `position_ids` restart at 0 with every sample (its rotary positions
    alone). `cu_seq_lens` (int32) holds the sample boundaries [0, l1, l1 + l2, ...] and `max_length` (int)
    the longest sample: the arguments of a variable-length attention kernel.
    """
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    boundaries = [0]
    for sample in samples:
        length = len(sample.input_ids)
        if length == 0:
            raise ValueError("cannot pack an empty sample")
        input_ids.extend(sample.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(sample.labels[1:])
        position_ids.extend(range(length))
        boundaries.append(boundaries[-1] + length)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "cu_seq_lens": torch.tensor(boundaries, dtype=torch.int32),
        "max_length": max(len(sample.input_ids) for sample in samples),
    }
