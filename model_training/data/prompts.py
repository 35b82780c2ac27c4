"""Prompts to continue, read from the run's data: PPO's and GRPO's rollouts, and the answers SFT writes after training.

- `load_prompts`: the RL stage's prompts, from a prompt file (`ppo.prompt_file`: {"prompt": text} or {"messages":
  [...]} per line, its other fields kept for GRPO's reward functions) or from the SFT sources of `datasets`, each
  conversation up to its last assistant turn (the assistant prefix included), deduplicated, checked against
  `ppo.max_prompt_length`; `prompts_digest` fingerprints them for a resume.
- `sample_prompts`: the prompts of `generate_samples` (single-turn queries) and the first `generate_val_samples`
  openings of validation conversations, each up to its first assistant turn.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_training.config import ConfigError, TrainConfig, resolve_input_path
from model_training.data.formatting import IGNORE_INDEX, FormattedSample, format_prompt
from model_training.data.prepare import PreparedData, TokenizedSplit, prepare_data
from model_training.data.records import InvalidRecord
from model_training.data.sources.preference_jsonl import prompt_turns
from model_training.data.sources.rows import convert_rows, read_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """A prompt to continue: where it came from (for messages and the samples tables) and its ids."""

    source: str
    input_ids: tuple[int, ...]
    fields: tuple[tuple[str, Any], ...] = ()
    """The prompt file record's other fields (e.g. a reference `answer`), which GRPO's reward functions read."""


def prepare_prompt_data(cfg: TrainConfig, tokenizer: Any) -> PreparedData | None:
    """What `load_prompts` reads through the token stores, prepared ahead (`--prepare_only`): the SFT datasets it
    takes the prompts from; None for a prompt file, which is read at each start."""
    return prepare_data(cfg, tokenizer) if cfg.ppo.prompt_file is None else None


def load_prompts(cfg: TrainConfig, tokenizer: Any) -> list[Prompt]:
    """The run's prompts (module docstring), each checked against `ppo.max_prompt_length`; ConfigError when one is
    longer or none is left."""
    if cfg.ppo.prompt_file is not None:
        prompts = _file_prompts(cfg, tokenizer)
    else:
        data = prepare_data(cfg, tokenizer)
        prompts = [Prompt(f"{split.name} #{index}", last_opening(sample))
                   for split in data.train for index, sample in enumerate(split.samples)]
    first: dict[tuple[int, ...], Prompt] = {}  # each prompt once, where it first appears
    for prompt in prompts:
        if prompt.input_ids:
            first.setdefault(prompt.input_ids, prompt)
    unique = list(first.values())
    if not unique and cfg.ppo.prompt_file is not None:
        raise ConfigError(f"key 'ppo.prompt_file': {resolve_input_path(cfg.ppo.prompt_file)} holds no prompt; expected "
                          'one JSON object a line, {"prompt": text} or {"messages": [...ending on a user turn]}')
    if not unique:
        raise ConfigError("no prompts: the conversations of 'datasets' hold no assistant turn to continue")
    limit = cfg.ppo.max_prompt_length
    if cfg.ppo.drop_long_prompts:
        kept = [p for p in unique if len(p.input_ids) <= limit]
        if len(kept) < len(unique):
            logger.warning("left out %d of %d prompts longer than ppo.max_prompt_length (%d tokens)",
                           len(unique) - len(kept), len(unique), limit)
        if not kept:
            raise ConfigError(f"every prompt is longer than 'ppo.max_prompt_length' ({limit}); raise the limit")
        return kept
    longest = max(unique, key=lambda p: len(p.input_ids))
    if len(longest.input_ids) > limit:
        raise ConfigError(f"the prompt {longest.source} is {len(longest.input_ids)} tokens long, longer than "
                          f"'ppo.max_prompt_length' ({limit}); raise the limit, or set ppo.drop_long_prompts=true")
    return unique


def last_opening(sample: FormattedSample) -> tuple[int, ...]:
    """The ids before the last assistant reply's first supervised token: the conversation so far and the assistant
    prefix. Empty for a sample without one (plain text, supervised from its first token)."""
    labels = sample.labels
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return tuple(sample.input_ids[: max(start, 0)])


PROMPT_FIELDS = ("prompt", "messages")
"""What a prompt file's record holds of the prompt itself; its other fields are kept with it (`Prompt.fields`)."""


def _file_prompts(cfg: TrainConfig, tokenizer: Any) -> list[Prompt]:
    """The prompts of `ppo.prompt_file`: {"prompt": text} or {"messages": [...]} per line (a leading system message,
    then turns alternating from the user and ending with one)."""
    path = resolve_input_path(cfg.ppo.prompt_file)
    try:
        table = read_rows(path, "ppo.prompt_file")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"key 'ppo.prompt_file': {err}") from None

    def convert(row: dict, index: int) -> Prompt:
        system, turns = prompt_turns(row)
        try:
            ids = format_prompt(turns, tokenizer, system, cfg.chat_format)
        except ValueError as err:
            raise InvalidRecord(str(err)) from None
        fields = tuple((key, value) for key, value in row.items()
                       if key not in PROMPT_FIELDS and value is not None)
        return Prompt(f"{path.name} line {index}", tuple(ids), fields)

    return convert_rows(table, convert, skip_invalid=False)


def prompts_digest(prompts: list[Prompt]) -> str:
    """A digest of the prompts in their order: a resume must draw from the same ones."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(np.asarray(prompt.input_ids, dtype=np.int64).tobytes() + b"|")
        if prompt.fields:  # only where there are any: the digests of earlier runs' prompts stay what they were
            digest.update(repr(prompt.fields).encode() + b"|")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class _Turn:
    role: str
    text: str


def sample_prompts(
    queries: list[str], val_splits: list[TokenizedSplit], val_count: int, tokenizer: Any, chat_format: str
) -> list[Prompt]:
    """The given queries as single-turn prompts, then the first `val_count` distinct openings of validation
    conversations (everything before their first supervised token: system, first prompt, assistant prefix)."""
    prompts = [
        Prompt("query", tuple(format_prompt([_Turn("prompter", q)], tokenizer, chat_format=chat_format)))
        for q in queries
    ]
    # Several validation samples can open alike (replies to the same prompt): each opening is asked once.
    openings: dict[tuple[int, ...], str] = {}
    for split in val_splits:
        for sample in split.samples:
            if len(openings) == val_count:  # the rest is not read (a store's samples are built when read)
                break
            opening = first_opening(sample)
            if opening:  # plain text is supervised from its first token: it has no prompt to answer
                openings.setdefault(opening, split.name)
    prompts += [Prompt(f"val/{name}", ids) for ids, name in openings.items()]
    return prompts


def first_opening(sample: FormattedSample) -> tuple[int, ...]:
    """The ids before the sample's first supervised token: the system, the first prompt and the assistant prefix."""
    first = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    return tuple(sample.input_ids[:first])
