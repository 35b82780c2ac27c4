"""GRPO's arithmetic (training/ppo/grpo.py) against hand computations in plain Python (float64) on fixed tensors."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from model_training.training.ppo.grpo import (
    STD_EPS,
    group_advantages,
    group_stats,
    k3,
    step_denominator,
    surrogate_sums,
    token_losses,
)

# Two groups of three continuations of 4, 2, 3 / 1, 4, 2 tokens.
MASK = torch.tensor(
    [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
LOGPROBS = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -9.0, -9.0], [-0.7, -0.2, -1.5, -5.0],
                         [-2.0, -3.0, -3.0, -3.0], [-0.4, -0.9, -0.1, -1.1], [-1.3, -0.6, -4.0, -4.0]],
                        dtype=torch.float64)
OLD = LOGPROBS + torch.tensor([[0.5, -0.1, 0.0, -0.4], [0.05, 0.3, 0.0, 0.0], [-0.3, 0.1, 0.25, 0.0],
                               [0.0, 0.0, 0.0, 0.0], [0.2, -0.5, 0.1, 0.02], [-0.15, 0.4, 0.0, 0.0]],
                              dtype=torch.float64)
REF = LOGPROBS + 0.3 * torch.sin(torch.arange(24, dtype=torch.float64)).reshape(6, 4)
REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0], dtype=torch.float64)
CLIP_LOW, CLIP_HIGH, KL_COEF = 0.2, 0.28, 0.05


def hand_advantages(scale: bool) -> list[float]:
    out = []
    for group in (REWARDS[:3].tolist(), REWARDS[3:].tolist()):
        mean, std = sum(group) / 3, statistics.stdev(group)  # the unbiased standard deviation
        out += [(r - mean) / (std + STD_EPS) if scale else r - mean for r in group]
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_are_relative_to_the_group(scale: bool) -> None:
    found = group_advantages(REWARDS, 3, scale_rewards=scale).tolist()
    assert found == pytest.approx(hand_advantages(scale), rel=1e-12)


def test_a_group_of_equal_rewards_has_zero_advantages_and_counts_as_flat() -> None:
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 1.0], dtype=torch.float64)
    assert group_advantages(rewards, 3, scale_rewards=True)[:3].tolist() == [0.0, 0.0, 0.0]
    spread, flat = group_stats(rewards, 3)
    assert int(flat) == 1
    assert spread.item() == pytest.approx(0.0 + statistics.pstdev([1.0, 0.0, 1.0]), rel=1e-12)


def hand_token_loss(b: int, t: int, advantage: float, kl_coef: float) -> tuple[float, bool, bool]:
    logp, old, ref = LOGPROBS[b, t].item(), OLD[b, t].item(), REF[b, t].item()
    ratio = math.exp(logp - old)
    clipped = min(max(ratio, 1 - CLIP_LOW), 1 + CLIP_HIGH)
    loss = -min(ratio * advantage, clipped * advantage)
    q = ref - logp
    loss += kl_coef * (math.exp(q) - q - 1)
    return loss, ratio < 1 - CLIP_LOW and advantage < 0, ratio > 1 + CLIP_HIGH and advantage > 0


@pytest.mark.parametrize("kl_coef", [0.0, KL_COEF])
def test_token_losses_are_the_asymmetrically_clipped_surrogate_plus_k3(kl_coef: float) -> None:
    advantages = group_advantages(REWARDS, 3, scale_rewards=True)
    losses, low, high = token_losses(LOGPROBS, OLD, REF, advantages, CLIP_LOW, CLIP_HIGH, kl_coef)
    bound = {"low": 0, "high": 0}
    for b in range(6):
        for t in range(4):
            expected, is_low, is_high = hand_token_loss(b, t, advantages[b].item(), kl_coef)
            assert losses[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-15), (b, t)
            assert (low[b, t].item(), high[b, t].item()) == (float(is_low), float(is_high)), (b, t)
            bound["low"] += is_low and MASK[b, t].item() == 1
            bound["high"] += is_high and MASK[b, t].item() == 1
    # The fixture is chosen so that both sides of the asymmetric clip bind somewhere: the test reaches both branches.
    assert bound["low"] > 0 and bound["high"] > 0


def test_k3_is_never_negative_and_zero_at_the_reference() -> None:
    assert k3(LOGPROBS, LOGPROBS).abs().max().item() == 0.0
    assert k3(LOGPROBS, REF).min().item() >= 0.0


def hand_step_loss(normalization: str, max_new_tokens: int) -> float:
    advantages = group_advantages(REWARDS, 3, scale_rewards=True)
    per_row = []
    for b in range(6):
        n = int(MASK[b].sum())
        per_row.append([hand_token_loss(b, t, advantages[b].item(), KL_COEF)[0] for t in range(n)])
    if normalization == "sequence":
        return sum(sum(row) / len(row) for row in per_row) / len(per_row)
    if normalization == "token":
        return sum(map(sum, per_row)) / sum(map(len, per_row))
    return sum(map(sum, per_row)) / (len(per_row) * max_new_tokens)


@pytest.mark.parametrize("normalization", ["sequence", "token", "constant"])
@pytest.mark.parametrize("split", [[6], [2, 4], [1, 1, 1, 1, 1, 1]])
def test_the_step_loss_is_the_same_however_the_rows_are_split(normalization: str, split: list[int]) -> None:
    """Numerators of the parts over the denominator counted on all parts: the hand-computed mean of the whole step,
    for each normalization (the parts stand for micro-batches and ranks)."""
    advantages = group_advantages(REWARDS, 3, scale_rewards=True)
    losses, _, _ = token_losses(LOGPROBS, OLD, REF, advantages, CLIP_LOW, CLIP_HIGH, KL_COEF)
    bounds = [sum(split[:i]) for i in range(len(split) + 1)]
    parts = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    denominator = sum(step_denominator(MASK[p], normalization, max_new_tokens=4) for p in parts)
    total = sum(surrogate_sums(losses[p], MASK[p], normalization) for p in parts) / denominator
    assert total.item() == pytest.approx(hand_step_loss(normalization, 4), rel=1e-12)


def test_the_three_normalizations_differ_on_unequal_lengths() -> None:
    """The choice is not cosmetic: on continuations of different lengths the three means differ."""
    values = {n: hand_step_loss(n, 4) for n in ("sequence", "token", "constant")}
    assert len({round(v, 9) for v in values.values()}) == 3, values
