"""GRPO's arithmetic: group-relative advantages and the clipped surrogate with its loss normalizations.

A step samples `group_size` continuations of each prompt; each continuation's reward is a weighted sum of reward
functions (training/rewards.py) and/or a reward model's score. There is no value model: a continuation's advantage
is its reward relative to the other continuations of the same prompt, the same on each of its tokens,

    A_i = (r_i - mean_group(r))                      scale_rewards false (Dr. GRPO)
    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)  scale_rewards true (GRPO; std unbiased, as TRL's)

and the policy's loss on a token is the clipped surrogate with an asymmetric clip (DAPO's clip-higher) plus, when
`kl_coef` > 0, the k3 estimate of KL(pi || pi_ref) (Schulman's: exp(q) - q - 1 with q = log pi_ref - log pi, never
negative, unbiased):

    loss_t = -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A) + kl_coef * k3_t,  r_t = exp(log pi - log pi_old)

How the token losses of a step are averaged is `loss_normalization`, and it matters (Dr. GRPO, DAPO):
- `sequence`: each continuation's mean over its tokens, then the mean over the step's continuations (the GRPO
  paper): a short continuation's tokens weigh more than a long one's;
- `token`: the sum over all the step's tokens / their number (DAPO): every token weighs the same;
- `constant`: the sum over all the step's tokens / (continuations x max_new_tokens) (Dr. GRPO): no length bias.

The step's continuations are on all ranks and in several micro-batches, so a micro-batch gives sums
(`surrogate_sums`) and the step's denominator (`step_denominator`) is counted over all of it before any backward:
however the rows fall into micro-batches and ranks, the gradient is that of the one mean.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4
"""Added to a group's standard deviation: a group whose rewards are all equal has advantages 0, not 0 / 0."""


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool) -> torch.Tensor:
    """Each continuation's advantage (module docstring) from the (N,) rewards of N / group_size groups, each group's
    continuations consecutive."""
    groups = rewards.reshape(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards:
        centered = centered / (groups.std(dim=1, keepdim=True) + STD_EPS)
    return centered.reshape(-1)


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The per-token k3 estimate of KL(pi || pi_ref): exp(q) - q - 1 with q = log pi_ref - log pi."""
    q = ref_logprobs - logprobs
    return torch.exp(q) - q - 1


def token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) per-token losses (module docstring), and the (B, T) indicators of the clip binding below (the ratio
    under 1 - clip_low with a negative advantage) and above (over 1 + clip_high with a positive one). `advantages`:
    (B,), one per continuation."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.to(logprobs.dtype).unsqueeze(1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantage
    losses = -torch.minimum(unclipped, clipped)
    if kl_coef and ref_logprobs is not None:
        losses = losses + kl_coef * k3(logprobs, ref_logprobs)
    low = (ratio < 1.0 - clip_low) & (advantage < 0)
    high = (ratio > 1.0 + clip_high) & (advantage > 0)
    return losses, low.to(logprobs.dtype), high.to(logprobs.dtype)


def surrogate_sums(losses: torch.Tensor, mask: torch.Tensor, normalization: str) -> torch.Tensor:
    """A micro-batch's share of the step's loss numerator: the sum of its sequence means (`sequence`) or of its
    tokens' losses (`token`, `constant`)."""
    if normalization == "sequence":
        return ((losses * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    return (losses * mask).sum()


def step_denominator(mask: torch.Tensor, normalization: str, max_new_tokens: int) -> torch.Tensor:
    """What the step's numerator is divided by, counted over the rows given (sum it over the step's micro-batches and
    ranks): continuations (`sequence`), tokens (`token`), continuations x max_new_tokens (`constant`)."""
    rows = torch.tensor(float(mask.shape[0]), dtype=torch.float64, device=mask.device)
    if normalization == "sequence":
        return rows
    if normalization == "token":
        return mask.sum().double()
    return rows * max_new_tokens



def group_stats(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the groups' reward standard deviations, number of groups whose rewards are all equal): the spread
    within groups, and how many carry no signal (all advantages 0)."""
    groups = rewards.reshape(-1, group_size)
    flat = (groups.max(dim=1).values == groups.min(dim=1).values).sum()
    return groups.std(dim=1, unbiased=False).sum(), flat

