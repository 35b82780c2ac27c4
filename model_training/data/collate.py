"""Formatted samples into a batch of tensors: one packed row, or right-padded rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_training.data.formatting import IGNORE_INDEX, FormattedSample
from model_training.data.packing import pack_samples


def pad_batch(
    samples: Sequence[FormattedSample], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack samples into `input_ids`, `attention_mask` and `labels`, long tensors of shape (batch, length).

    Rows are right-padded with `pad_token_id` to the longest sample, rounded up to a multiple of
    `pad_to_multiple_of` when given. `attention_mask` is 1 on real tokens and 0 on padding; `labels` is
    IGNORE_INDEX on padding. Both come from the sample lengths, never from comparing ids with the pad id:
    Falcon's pad id is its eos, which every turn ends with.

    `labels` are aligned with `input_ids` (Hugging Face's convention): labels[t] is the target of the
    prediction made at position t - 1, and the model's loss shifts them by one.
    """
    if not samples:
        raise ValueError("cannot pad an empty batch")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
    length = max(len(sample.input_ids) for sample in samples)
    if pad_to_multiple_of is not None:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(samples), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate(
    samples: Sequence[FormattedSample], packing: bool, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor | int]:
    """The model's inputs for `samples` and their `labels`, as keyword arguments named like the model's.

    With `packing`, one padding-free row (`pack_samples`: `input_ids`, `position_ids` that restart with each
    sample, the boundaries `cu_seq_lens` and `max_length`, no `attention_mask`); otherwise `pad_batch`'s
    right-padded rows with their `attention_mask`. Both give the same per-sample losses on a model with packed
    attention (`model_training.models.packed_attention`).
    """
    if packing:
        return pack_samples(samples)
    return pad_batch(samples, pad_token_id, pad_to_multiple_of)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for a GPU goes through pinned memory, asynchronously, so the
    copy queues behind the work in flight and the host does not wait for the device."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
