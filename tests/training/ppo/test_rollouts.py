"""PPO's rollouts (training/ppo/rollouts.py; the prompts: data/prompts.py): prompts, their draw, the padded rows and
what models read from them, on the tiny Falcon as trainer_rl.py builds it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from model_training.config import ConfigError, load_config
from model_training.data.formatting import format_conversation, format_prompt
from model_training.data.prompts import Prompt, last_opening, load_prompts
from model_training.data.records import FileFormatError
from model_training.models.builder import build_model, load_tokenizer
from model_training.models.reward_head import reward_position
from model_training.training.ppo.rollouts import (
    Rollouts,
    _until_end,
    check_same_tokenizer,
    draw_prompts,
    generate,
    sequence_scores,
    token_logprobs,
)

SECTIONS = ["defaults", "tiny-falcon", "oasst-sample"]


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    return load_tokenizer(load_config(SECTIONS))


def test_a_conversation_is_prompted_up_to_its_last_assistant_turn(tokenizer) -> None:  # noqa: ANN001
    turns = [Turn("prompter", "Hi there."), Turn("assistant", "Hello!"), Turn("prompter", "Name a river."),
             Turn("assistant", "The Nile.")]
    sample = format_conversation(turns, tokenizer, max_length=None)
    assert list(last_opening(sample)) == format_prompt(turns[:3], tokenizer)


def test_a_prompt_file_reads_both_forms_dedupes_and_names_a_bad_line(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    rows = [{"prompt": "Name a river."}, {"messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Name a city."}]},
            {"prompt": "Name a river."}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(SECTIONS, [("ppo.prompt_file", str(path))])
    prompts = load_prompts(cfg, tokenizer)
    assert [p.input_ids for p in prompts] == [
        tuple(format_prompt([Turn("prompter", "Name a river.")], tokenizer)),
        tuple(format_prompt([Turn("prompter", "Name a city.")], tokenizer, system="Be brief.")),
    ]
    assert prompts[0].source == "prompts.jsonl line 1"
    with pytest.raises(ConfigError, match=r"the prompt prompts.jsonl line 2 is \d+ tokens long, longer than "
                                          r"'ppo.max_prompt_length' \(6\)"):
        load_prompts(replace(cfg, ppo=replace(cfg.ppo, max_prompt_length=6)), tokenizer)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    with pytest.raises(FileFormatError, match=r"prompts.jsonl, line 2: .*roles alternate"):
        load_prompts(cfg, tokenizer)


def test_a_model_of_another_tokenizer_is_refused_with_the_entries_that_differ(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    tokenizer.save_pretrained(tmp_path / "same")
    check_same_tokenizer(tokenizer, str(tmp_path / "same"), "ppo.reward_model")
    other = load_tokenizer(load_config(SECTIONS))
    other.add_tokens(["<|other|>"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"key 'ppo.value_model': \S+/other was trained with another tokenizer than "
                                          r"the policy's \(2027 tokens there, 2026 here; differing entries such as "
                                          r"'<\|other\|>'\)"):
        check_same_tokenizer(tokenizer, str(tmp_path / "other"), "ppo.value_model")


def test_each_step_draws_its_share_per_rank_and_every_prompt_once_per_pass() -> None:
    prompts = [Prompt(str(i), (i,)) for i in range(10)]
    def drawn(step: int) -> list[str]:  # both ranks' prompts of the step
        return [p.source for rank in range(2) for p in draw_prompts(prompts, step, 4, seed=7, rank=rank, world_size=2)]

    assert all(len(drawn(step)) == 4 for step in range(5))
    first_pass = drawn(0) + drawn(1)
    # Steps 0 and 1 read positions 0-7 of the first pass; the pass holds each prompt once.
    assert len(set(first_pass)) == 8
    assert draw_prompts(prompts, 3, 4, 7, 1, 2) == draw_prompts(prompts, 3, 4, 7, 1, 2)
    assert draw_prompts(prompts, 3, 4, 8, 1, 2) != draw_prompts(prompts, 3, 4, 7, 1, 2)


def test_a_continuation_ends_at_its_first_end_token() -> None:
    continuations = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 2], [5, 6, 7, 8, 9]])
    assert _until_end(continuations, eos_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.usefixtures("one_rank_group")
def test_padded_rows_read_what_each_sequence_alone_reads(tokenizer) -> None:  # noqa: ANN001
    """Log-probabilities and reward scores of left-padded, right-padded rows equal those of each sequence alone."""
    cfg = load_config(SECTIONS, [("packing", True)])
    policy = build_model(cfg, tokenizer, {}).eval()
    reward = build_model(replace(cfg, stage="rm"), tokenizer, {}).eval()
    prompts = [Prompt("a", tuple(format_prompt([Turn("prompter", "Name a river.")], tokenizer))),
               Prompt("b", tuple(format_prompt([Turn("prompter", "Name a large city in the north.")], tokenizer)))]
    ppo = replace(cfg.ppo, max_new_tokens=6, rollout_batch_size=1)  # two chunks of different widths, then joined
    torch.manual_seed(0)
    rollouts = generate(policy, prompts, ppo, tokenizer, partitioned=False)
    assert rollouts.sequences.shape[1] == rollouts.prompt_width + rollouts.mask.shape[1]
    with torch.no_grad():
        logprobs, _ = token_logprobs(policy, rollouts, temperature=1.0)
        scores = sequence_scores(reward, rollouts, tokenizer.pad_token_id)
        for row in range(2):
            alone = _alone(rollouts, row)
            ids = alone.sequences[0].tolist()
            expected, _ = token_logprobs(policy, alone, temperature=1.0)
            n = alone.mask.shape[1]
            assert torch.allclose(logprobs[row, :n], expected[0], atol=1e-5)
            assert (logprobs[row, n:] * rollouts.mask[row, n:]).abs().sum() == 0
            pooled = reward(input_ids=alone.sequences)[0, reward_position(ids, tokenizer.pad_token_id)]
            assert scores[row].item() == pytest.approx(pooled.item(), abs=1e-5)


def _alone(rollouts: Rollouts, row: int) -> Rollouts:
    """Row `row` without any padding."""
    keep = rollouts.attention_mask[row] == 1
    prompt = int(keep[: rollouts.prompt_width].sum())
    sequence = rollouts.sequences[row][keep].unsqueeze(0)
    return Rollouts(sequence, torch.ones_like(sequence), prompt, [rollouts.sources[row]])
