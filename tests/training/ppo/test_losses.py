"""PPO's arithmetic (training/ppo/losses.py) against hand computations in plain Python on fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from model_training.training.ppo.losses import gae, policy_loss, token_rewards, value_loss, whiten

# Two continuations: 4 tokens, then 2 tokens and padding.
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
LOGPROBS = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -9.0, -9.0]], dtype=torch.float64)
REF = torch.tensor([[-1.2, -0.5, -1.0, -0.4], [-0.1, -1.0, -3.0, -3.0]], dtype=torch.float64)
SCORES = torch.tensor([2.0, -1.0], dtype=torch.float64)
VALUES = torch.tensor([[0.5, 0.4, 0.2, 0.1], [0.3, -0.2, 7.0, 7.0]], dtype=torch.float64)


def rows(mask: torch.Tensor) -> list[int]:
    return [int(n) for n in mask.sum(dim=1)]


def test_token_rewards_are_the_kl_penalty_with_the_score_on_the_last_token() -> None:
    rewards, kl = token_rewards(SCORES, LOGPROBS, REF, MASK, kl_coef=0.01)
    for b, n in enumerate(rows(MASK)):
        for t in range(4):
            expected = 0.0
            if t < n:
                expected = -0.01 * (LOGPROBS[b, t].item() - REF[b, t].item())
                expected += SCORES[b].item() if t == n - 1 else 0.0
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-12), (b, t)
    assert kl[1, 2:].tolist() == [0.0, 0.0]


def test_without_score_on_eod_the_score_is_spread_over_the_continuation() -> None:
    rewards, _ = token_rewards(SCORES, LOGPROBS, REF, MASK, kl_coef=0.01, score_on_eod=False)
    for b, n in enumerate(rows(MASK)):
        for t in range(n):
            expected = -0.01 * (LOGPROBS[b, t].item() - REF[b, t].item()) + SCORES[b].item() / n
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-12), (b, t)
        assert rewards[b, n:].abs().sum() == 0


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5)])
def test_gae_equals_the_sum_of_discounted_td_errors(gamma: float, lam: float) -> None:
    rewards, _ = token_rewards(SCORES, LOGPROBS, REF, MASK, kl_coef=0.01)
    advantages, returns = gae(rewards, VALUES, MASK, gamma, lam)
    for b, n in enumerate(rows(MASK)):
        r, v = rewards[b, :n].tolist(), VALUES[b, :n].tolist() + [0.0]  # no value past the end
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[b, t].item() == pytest.approx(expected, rel=1e-12)
            assert returns[b, t].item() == pytest.approx(expected + v[t], rel=1e-12)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_whitening_uses_the_masked_tokens_only() -> None:
    values = [x for b, n in enumerate(rows(MASK)) for x in VALUES[b, :n].tolist()]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
    whitened = whiten(VALUES, MASK)
    assert whitened[0, 0].item() == pytest.approx((VALUES[0, 0].item() - mean) / std, rel=1e-6)
    assert whitened[1, 2:].tolist() == [0.0, 0.0]
    assert whiten(VALUES, MASK, shift_mean=False)[0, 0].item() == pytest.approx(
        (VALUES[0, 0].item() - mean) / std + mean, rel=1e-6)


def test_the_clipped_policy_loss_and_its_clip_fraction() -> None:
    old = LOGPROBS + torch.tensor([[0.0, 0.5, -0.5, 0.05], [0.3, -0.3, 0.0, 0.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -2.0, 0.5, 1.5], [-1.0, 2.0, 3.0, 3.0]], dtype=torch.float64)
    loss, clipped = policy_loss(LOGPROBS, old, advantages, MASK, clip=0.2)
    terms, binds = [], []
    for b, n in enumerate(rows(MASK)):
        for t in range(n):
            ratio = math.exp(LOGPROBS[b, t].item() - old[b, t].item())
            a = advantages[b, t].item()
            plain, cut = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            terms.append(max(plain, cut))
            binds.append(cut > plain)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert clipped.item() == pytest.approx(sum(binds) / len(binds))
    assert 0 < clipped.item() < 1  # the case exercises both sides


def test_the_clipped_value_loss_and_its_clip_fraction() -> None:
    old = VALUES + torch.tensor([[0.5, -0.1, 0.0, -0.3], [0.05, 0.4, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[0.0, 0.0, 0.3, -0.5], [0.2, 0.5, 0.0, 0.0]], dtype=torch.float64)
    loss, clipped = value_loss(VALUES, old, returns, MASK, clip=0.2)
    terms, binds = [], []
    for b, n in enumerate(rows(MASK)):
        for t in range(n):
            v, o, r = VALUES[b, t].item(), old[b, t].item(), returns[b, t].item()
            cut = o + min(max(v - o, -0.2), 0.2)
            terms.append(max((v - r) ** 2, (cut - r) ** 2))
            binds.append((cut - r) ** 2 > (v - r) ** 2)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-12)
    assert clipped.item() == pytest.approx(sum(binds) / len(binds))
    assert 0 < clipped.item() < 1


def test_whitening_a_batch_split_in_parts_equals_whitening_it_whole() -> None:
    """As over ranks: each part whitened with `total` adding the other part's sums (what the all-reduce does) equals
    the whole batch whitened at once."""
    whole = whiten(VALUES, MASK)
    for index in (0, 1):
        x, mask = VALUES[index : index + 1], MASK[index : index + 1]
        other_x, other_mask = VALUES[1 - index : 2 - index], MASK[1 - index : 2 - index]
        mean = (VALUES * MASK).sum() / MASK.sum()
        # whiten asks for two totals: (sum, count), then the sum of squared deviations from the joint mean.
        others = iter([torch.stack([(other_x * other_mask).sum(), other_mask.sum()]),
                       ((other_x - mean) ** 2 * other_mask).sum()])
        split = whiten(x, mask, total=lambda t, others=others: t + next(others))
        assert torch.allclose(split, whole[index : index + 1], rtol=1e-12)
