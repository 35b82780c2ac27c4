"""Token-sum cross-entropy: supervised positions only, shifted by one, in fp32; also chunked from hidden states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_training.data.formatting import IGNORE_INDEX
from model_training.training.loss import chunked_supervised_token_sums, count_supervised, supervised_token_sums


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


def projection_problem(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states (2, 23, 16), a (50, 16) output projection and labels with ~40% of positions ignored.

    A third of the supervised labels are the model's own argmax, so the correct count is not trivially 0.
    """
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 23, 16, generator=generator, dtype=dtype)
    weight = torch.randn(50, 16, generator=generator, dtype=dtype)
    labels = torch.randint(0, 50, (2, 23), generator=generator)
    predicted = torch.cat([torch.zeros(2, 1, dtype=torch.long), (hidden @ weight.T).argmax(-1)[:, :-1]], dim=1)
    labels = torch.where(torch.rand(2, 23, generator=generator) < 0.33, predicted, labels)
    labels[torch.rand(2, 23, generator=generator) < 0.4] = IGNORE_INDEX
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_sums_and_gradients_equal_the_full_logits_version(dtype: torch.dtype, chunk_size: int) -> None:
    hidden, weight, labels = projection_problem(dtype)
    expected_loss, expected_correct = supervised_token_sums(hidden @ weight.T, labels)
    expected_grads = torch.autograd.grad(expected_loss * 0.7, [hidden, weight])

    loss, correct = chunked_supervised_token_sums(hidden, weight, labels, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss * 0.7, [hidden, weight])  # an upstream scale, as a normalizing caller has

    # fp64 inputs: this loss stays fp64, supervised_token_sums reduces in fp32.
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=1e-6, atol=0, check_dtype=False)
    assert int(correct) == int(expected_correct) > 0
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == dtype
        assert relative_error(grad, expected) <= 1e-6


def test_ignored_positions_are_never_projected() -> None:
    """NaN hidden states where no label follows would poison any product that included them."""
    hidden, weight, labels = projection_problem(torch.float32)
    predicts_nothing = torch.cat([labels[:, 1:] == IGNORE_INDEX, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    poisoned = hidden.detach().masked_fill(predicts_nothing[..., None], float("nan")).requires_grad_()
    loss, _ = chunked_supervised_token_sums(poisoned, weight, labels, chunk_size=4)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(weight.grad).all()
    assert torch.equal(poisoned.grad[predicts_nothing], torch.zeros_like(poisoned.grad[predicts_nothing]))
    torch.testing.assert_close(loss, chunked_supervised_token_sums(hidden, weight, labels)[0])


def test_chunked_sums_without_supervised_tokens_are_zero_with_zero_gradients() -> None:
    hidden, weight, _ = projection_problem(torch.float32)
    loss, correct = chunked_supervised_token_sums(hidden, weight, torch.full((2, 23), IGNORE_INDEX))
    loss.backward()
    assert (loss.item(), correct.item()) == (0.0, 0)
    assert not hidden.grad.any() and not weight.grad.any()
