"""Cross-entropy over supervised tokens, as sums, so the caller can normalize by the whole step's count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_training.data.formatting import IGNORE_INDEX


def supervised_token_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of correct next-token predictions) over supervised positions.

    `labels` are aligned with the inputs; position t predicts labels[t + 1]. The loss is computed in fp32
    whatever the logits' dtype: bf16 log-softmax over a 65k vocabulary loses most of its precision.
    A sum, not a mean: the caller divides by the supervised tokens of the whole optimizer step, so that
    every token weighs the same however the step is split into micro-batches and ranks.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    flat_logits = shift_logits.reshape(-1, shift_logits.size(-1))
    flat_labels = shift_labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    supervised = flat_labels != IGNORE_INDEX
    correct = (flat_logits.argmax(dim=-1)[supervised] == flat_labels[supervised]).sum()
    return loss_sum, correct


def count_supervised(labels: torch.Tensor) -> int:
    """Supervised targets in a batch: labels past the first position that carry loss."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
