"""Padding-free packing: the samples of a micro-batch (chosen by the seeded step plan) as one row.

A packed row is the samples' tokens laid end to end with no padding. It only trains like the samples one by
one when the model isolates them (each sample attends to itself, rotary positions restart at 0:
`model_training.models.packed_attention`) and when no label crosses a boundary, which `pack_samples` guarantees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_training.data.formatting import IGNORE_INDEX, FormattedSample


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
