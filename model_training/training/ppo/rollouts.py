"""PPO's rollouts: the prompts, the continuations sampled from the policy, and what the four models say of them.

Prompts come from a prompt file (`ppo.prompt_file`) or from the SFT sources of `datasets`, each conversation up to
its last assistant turn (the assistant prefix included), deduplicated. Step k reads the prompts at positions
[k * num_rollouts, (k + 1) * num_rollouts) of an endless sequence of seeded permutations, one per pass, and rank r
takes every world_size-th of them: the draw follows from the step alone, so a resume draws what the run would have.

A rank's rollouts are one batch of rows, left-padded prompts of width P then continuations of width T:

    sequences       (B, P + T)  ids; pad after a continuation's end, and before a shorter prompt
    attention_mask  (B, P + T)  1 on the prompt's tokens and on the continuation up to its end token, included

Per-token tensors are (B, T), over the continuation tokens: column t is the token at P + t, predicted at position
P + t - 1, where its log-probability and the value of the state before it are read (`token_logprobs`,
`token_values`). The reward model reads the whole row at its reward position (models/reward_head.py), the last
token that is not the pad token, as it was trained.

Under ZeRO-3 every forward gathers the weights layer by layer from all ranks, so the ranks must make the same calls:
each rank holds the same number of rollouts, generates and scores them in the same number of chunks, and generation
runs with `synced_gpus` until every rank's continuations have ended.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from model_training.config import ConfigError, PpoConfig
from model_training.data.prompts import Prompt

logger = logging.getLogger(__name__)


def draw_prompts(prompts: list[Prompt], step: int, count: int, seed: int, rank: int, world_size: int) -> list[Prompt]:
    """This rank's prompts of step `step` (0-based): every world_size-th of the step's `count` (module docstring)."""
    drawn = []
    for position in range(step * count + rank, (step + 1) * count, world_size):
        epoch, index = divmod(position, len(prompts))
        order = np.random.default_rng([seed, epoch]).permutation(len(prompts))
        drawn.append(prompts[order[index]])
    return drawn


@dataclass
class Rollouts:
    """One rank's rollouts of a step (module docstring): the rows, then what the models said of them."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    sources: list[str]
    logprobs: torch.Tensor | None = None
    """(B, T) log-probabilities of the continuation tokens under the policy that sampled them."""
    ref_logprobs: torch.Tensor | None = None
    """(B, T) the same under the frozen reference."""
    values: torch.Tensor | None = None
    """(B, T) the value model's estimate of the state before each token."""
    scores: torch.Tensor | None = None
    """(B,) the reward model's score of each row."""

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) 1 on the continuation tokens up to the end token, included."""
        return self.attention_mask[:, self.prompt_width :]

    @property
    def continuations(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width :]

    def rows(self, index: slice | torch.Tensor) -> Rollouts:
        """The rollouts of some rows, without the padding columns none of them needs."""
        mask = self.attention_mask[index]
        used = mask.any(dim=0).nonzero().flatten()
        # Every prompt has a token and every continuation its first one, so first < P < last.
        first, last = int(used[0]), int(used[-1]) + 1
        width = last - self.prompt_width

        def per_token(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index][:, :width]

        kept = torch.arange(len(self.sources))[index].tolist()
        return Rollouts(self.sequences[index][:, first:last], mask[:, first:last], self.prompt_width - first,
                        [self.sources[i] for i in kept], per_token(self.logprobs), per_token(self.ref_logprobs),
                        per_token(self.values), None if self.scores is None else self.scores[index])


@torch.no_grad()
def generate(model: Any, prompts: list[Prompt], ppo: PpoConfig, tokenizer: Any, partitioned: bool) -> Rollouts:
    """Sample a continuation of each prompt from `model`, `ppo.rollout_batch_size` prompts at a time, with the
    config's sampling settings; the rows padded to one width (module docstring)."""
    config = GenerationConfig(
        do_sample=True, top_k=0, top_p=ppo.top_p, temperature=ppo.temperature, max_new_tokens=ppo.max_new_tokens,
        min_new_tokens=ppo.min_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(prompts), ppo.rollout_batch_size):
        batch = prompts[start : start + ppo.rollout_batch_size]
        ids, mask = _left_padded([p.input_ids for p in batch], tokenizer.pad_token_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=partitioned)
        continuation = out[:, ids.shape[1] :]
        chunks.append((ids, mask, continuation, _until_end(continuation, tokenizer.eos_token_id)))
    model.train(was_training)
    return _joined(chunks, tokenizer.pad_token_id, [p.source for p in prompts])


def _left_padded(rows: list[tuple[int, ...]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _until_end(continuation: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on each continuation's tokens up to its first end token, included; 0 after (the padding generate added)."""
    is_end = (continuation == eos_id).long()
    return ((is_end.cumsum(dim=1) - is_end) == 0).long()


def _joined(chunks: list[tuple[torch.Tensor, ...]], pad_id: int, sources: list[str]) -> Rollouts:
    """The chunks' rows in one batch: prompts left-padded to the widest, continuations right-padded to the longest."""
    prompt_width = max(ids.shape[1] for ids, *_ in chunks)
    length = max(cont.shape[1] for *_, cont, _ in chunks)
    sequences, masks = [], []
    for ids, mask, cont, cont_mask in chunks:
        left, right = prompt_width - ids.shape[1], length - cont.shape[1]
        sequences.append(torch.cat([F.pad(ids, (left, 0), value=pad_id), F.pad(cont, (0, right), value=pad_id)], 1))
        masks.append(torch.cat([F.pad(mask, (left, 0)), F.pad(cont_mask, (0, right))], 1))
    # Past a continuation's end the ids are the pad id, so that the reward position is its last real token.
    sequences = torch.cat(sequences).masked_fill(torch.cat(masks) == 0, pad_id)
    return Rollouts(sequences, torch.cat(masks), prompt_width, sources)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding), as generation counts them."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def token_logprobs(
    model: Any, rollouts: Rollouts, temperature: float, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probabilities of the continuation tokens under `model` at the sampling temperature, and with
    `entropy` the (B, T) entropy of its distribution at each of them."""
    logits = _forward(model, rollouts).logits[:, rollouts.prompt_width - 1 : -1].float() / temperature
    logps = F.log_softmax(logits, dim=-1)
    taken = logps.gather(-1, rollouts.continuations.unsqueeze(-1)).squeeze(-1)
    return taken, -(logps.exp() * logps).sum(-1) if entropy else None


def token_values(model: Any, rollouts: Rollouts) -> torch.Tensor:
    """(B, T) the value model's estimate of the state before each continuation token."""
    return _forward(model, rollouts)[:, rollouts.prompt_width - 1 : -1].float()


def sequence_scores(model: Any, rollouts: Rollouts, pad_id: int) -> torch.Tensor:
    """(B,) the reward model's score of each row, read at its reward position: the last token that is not `pad_id`."""
    scores = _forward(model, rollouts).float()
    real = (rollouts.attention_mask == 1) & (rollouts.sequences != pad_id)
    columns = torch.arange(real.shape[1], device=real.device)
    return scores.gather(1, (columns * real).argmax(dim=1, keepdim=True)).squeeze(1)


def _forward(model: Any, rollouts: Rollouts) -> Any:
    mask = rollouts.attention_mask
    return model(input_ids=rollouts.sequences, attention_mask=mask, position_ids=position_ids(mask))


def decode_texts(rollouts: Rollouts, tokenizer: Any, count: int | None = None) -> list[tuple[str, str]]:
    """(prompt, continuation) text of the first `count` rollouts (all with None): the prompt as the chat format shows
    it to the model, the continuation without its end token."""
    texts = []
    for i in range(len(rollouts.sources) if count is None else min(count, len(rollouts.sources))):
        width = rollouts.prompt_width
        prompt = rollouts.sequences[i, :width][rollouts.attention_mask[i, :width] == 1]
        continuation = rollouts.continuations[i][rollouts.mask[i] == 1]
        texts.append((tokenizer.decode(prompt), tokenizer.decode(continuation, skip_special_tokens=True)))
    return texts


def decode_samples(rollouts: Rollouts, tokenizer: Any, count: int) -> list[dict[str, Any]]:
    """The first `count` rollouts as rows {source, prompt, continuation, score} of the samples table."""
    return [{"source": rollouts.sources[i], "prompt": prompt, "continuation": continuation,
             "score": None if rollouts.scores is None else round(float(rollouts.scores[i]), 4)}
            for i, (prompt, continuation) in enumerate(decode_texts(rollouts, tokenizer, count))]


def check_same_tokenizer(tokenizer: Any, folder: str, key: str) -> None:
    """ConfigError unless the tokenizer saved with the model `key` names has the policy's vocabulary: a reward model
    of another tokenizer would score ids that mean other text."""
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"key '{key}': cannot load the tokenizer saved with {folder}: {err}") from None
    ours, theirs = tokenizer.get_vocab(), other.get_vocab()
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
        raise ConfigError(
            f"key '{key}': {folder} was trained with another tokenizer than the policy's ({len(theirs)} tokens there, "
            f"{len(ours)} here; differing entries such as {', '.join(repr(t) for t, _ in differ)}); train the reward "
            "model from the policy's tokenizer"
        )

