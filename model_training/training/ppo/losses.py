"""PPO's arithmetic on per-token tensors of a batch of continuations: rewards, advantages and the clipped losses.

Every function takes `(batch, tokens)` tensors of the continuation tokens only (the prompt left out) and a `mask`,
1 on real continuation tokens and 0 on the padding after a continuation's end, and never reads a masked position:

- `token_rewards`: the per-token reward, -kl_coef * (log pi - log pi_ref) on every token (the KL penalty against
  the frozen reference), plus the reward model's score on the continuation's last token ("score on EOD"), or
  spread evenly over its tokens;
- `gae`: generalized advantage estimation, A_t = sum_l (gamma lambda)^l delta_{t+l} with
  delta_t = r_t + gamma V_{t+1} - V_t, V past the last token being 0, and the returns A_t + V_t;
- `whiten`: (x - mean) / std over the masked tokens of the whole batch (of every rank, given their sum);
- `policy_loss`: the clipped surrogate, mean over tokens of max(-A r, -A clip(r, 1 - e, 1 + e)) with
  r = exp(log pi - log pi_old), and the fraction of tokens where the clip binds;
- `value_loss`: 0.5 * mean of max((V - R)^2, (clip(V, V_old - e, V_old + e) - R)^2), and its clip fraction.
Means are over the masked tokens of the batch, as TRL's and the published recipe's trainers take them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over the positions where `mask` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> torch.Tensor:
    """`x` normalized to unit variance over the masked positions (and to zero mean with `shift_mean`); masked-out
    positions are 0. The variance is the unbiased one, as TRL's. `total(t)`: the sum of `t` over the batch's parts
    (an all-reduce over the ranks), for a batch split over ranks."""
    sums = total(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]))
    mean, count = sums[0] / sums[1].clamp(min=1), sums[1]
    variance = total(((x - mean) ** 2 * mask).sum()) / (count - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    score_on_eod: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL estimate log pi - log pi_ref): the KL penalty on every token and each
    continuation's score (`scores`, one per row) added on its last real token, or with `score_on_eod` false, an equal
    share of it on each of its tokens. `mask` is 1 from column 0 to each continuation's end."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=1)
    scores = scores.to(rewards.dtype)
    if score_on_eod:
        last = (lengths.long() - 1).clamp(min=0)
        rows = torch.arange(len(scores), device=scores.device)
        rewards[rows, last] += scores * (lengths > 0)
    else:
        rewards += (scores / lengths.clamp(min=1)).unsqueeze(1)
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of each token, by generalized advantage estimation backwards through the tokens; the
    value after a continuation's last token is 0 (the episode ends there)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        # Past the end, mask 0: nothing flows back from padding into the last real token.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped surrogate loss, fraction of tokens where the clip binds), means over the masked tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).to(logprobs.dtype), mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped value loss, fraction of tokens where the clip binds), means over the masked tokens."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).to(values.dtype), mask)
