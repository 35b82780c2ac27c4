"""Token-sum cross-entropy: supervised positions only, shifted by one, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_training.data.formatting import IGNORE_INDEX
from model_training.training.loss import count_supervised, supervised_token_sums


def test_sums_match_a_hand_computed_loss_over_supervised_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, 4, 4, IGNORE_INDEX]])
    loss_sum, correct = supervised_token_sums(logits, labels)
    expected = sum(
        F.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum")
        for b in range(2) for t in range(1, 5) if labels[b, t] != IGNORE_INDEX
    )
    assert torch.allclose(loss_sum, expected)
    hits = sum(int(logits[b, t - 1].argmax() == labels[b, t]) for b in range(2) for t in range(1, 5)
               if labels[b, t] != IGNORE_INDEX)
    assert int(correct) == hits
    assert count_supervised(labels) == 5


def test_bf16_logits_are_reduced_in_fp32() -> None:
    logits = torch.randn(1, 4, 65024).bfloat16()
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7]])
    loss_sum, _ = supervised_token_sums(logits, labels)
    assert loss_sum.dtype == torch.float32
    assert torch.allclose(loss_sum, supervised_token_sums(logits.float(), labels)[0])
