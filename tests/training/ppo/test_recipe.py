"""The PPO recipe's checks before anything trains (training/ppo/recipe.py): the split of the rollouts, the models'
sources and the fingerprint a resume must match."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from helpers import VOCAB_ROWS

from model_training.config import ConfigError, TrainConfig, load_config
from model_training.models.builder import load_tokenizer
from model_training.training.distributed import DistInfo
from model_training.training.ppo.recipe import (
    ModelSources,
    _check_reward_and_value_models,
    _fingerprint_models,
    _model_sources,
    plan_steps,
)

SECTIONS = ["defaults", "tiny-falcon", "oasst-sample", "tiny-ppo"]


def ppo_config(tmp_path: Path, **ppo: object) -> TrainConfig:
    runs = []
    for key, name in (("model_name", "sft"), ("ppo.reward_model", "rm")):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        (folder / "latest").write_text("checkpoint-000001\n")  # a run folder to the config
        runs.append((key, str(folder)))
    return load_config(SECTIONS, runs + [(f"ppo.{k}", v) for k, v in ppo.items()], stage="rl")


def test_the_rollouts_split_into_whole_micro_batches_of_each_optimizer_step(tmp_path: Path) -> None:
    cfg = ppo_config(tmp_path, num_rollouts=32, value_steps_per_epoch=2)
    plan = plan_steps(cfg, world_size=2)
    assert (plan.rollouts, plan.policy_rows, plan.value_rows, plan.micro_batch) == (16, 16, 8, 4)
    with pytest.raises(ConfigError, match="key 'ppo.num_rollouts' is 32, which 3 ranks cannot share evenly"):
        plan_steps(cfg, world_size=3)
    with pytest.raises(ConfigError, match=r"each rank's 16 rollouts per step do not split into "
                                          r"'ppo.value_steps_per_epoch' \(8\) optimizer steps of whole micro-batches"):
        plan_steps(ppo_config(tmp_path, num_rollouts=32, value_steps_per_epoch=8), world_size=2)


def save_tiny(folder: Path, reward: bool) -> Path:
    """A tiny Falcon (a reward model with `reward`) and the policy's tokenizer, as an export saves them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"])
    options = dict(cfg.model_config)
    head = {"num_labels": 1} if reward else {}
    config = AutoConfig.for_model(options.pop("model_type"), **options, vocab_size=VOCAB_ROWS, **head)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(folder)
    load_tokenizer(cfg).save_pretrained(folder)
    return folder


def no_export(checkpoint: Path, target: Path, dtype: str) -> None:
    raise AssertionError(f"model folders are loaded as they are, not exported: {checkpoint}")


def test_a_chat_model_as_the_reward_model_is_refused(tmp_path: Path) -> None:
    cfg = replace(ppo_config(tmp_path), model_name=str(save_tiny(tmp_path / "policy", reward=False)))
    chat, tokenizer = cfg.model_name, load_tokenizer(load_config(["defaults", "tiny-falcon", "oasst-sample"]))
    alone = DistInfo(rank=0, world_size=1, local_rank=0)
    with pytest.raises(ConfigError, match=r"key 'ppo.reward_model': \S+/policy is a FalconForCausalLM, not a reward "
                                          r"model"):
        _check_reward_and_value_models(replace(cfg, ppo=replace(cfg.ppo, reward_model=chat)), tokenizer)
    reward = str(save_tiny(tmp_path / "reward", reward=True))
    with_reward = replace(cfg, ppo=replace(cfg.ppo, reward_model=reward))
    _check_reward_and_value_models(with_reward, tokenizer)
    sources = _model_sources(with_reward, alone, no_export)
    assert (sources.policy.model_name, sources.reward, sources.value) == (chat, reward, reward)
    # GRPO: no value model; with reward functions alone, no reward model either.
    grpo = _model_sources(replace(with_reward, rl_algorithm="grpo"), alone, no_export)
    assert (grpo.reward, grpo.value) == (reward, None)
    alone_functions = replace(cfg, rl_algorithm="grpo", ppo=replace(cfg.ppo, reward_model=None))
    functions_only = _model_sources(alone_functions, alone, no_export)
    assert (functions_only.reward, functions_only.value) == (None, None)


def test_the_fingerprint_follows_the_models_files_and_where_they_were_exported_from(tmp_path: Path) -> None:
    cfg = ppo_config(tmp_path)
    policy, reward = tmp_path / "policy", tmp_path / "reward"
    for folder in (policy, reward):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    sources = ModelSources(replace(cfg, model_name=str(policy)), str(reward), str(reward))
    first = _fingerprint_models(cfg, sources)
    assert _fingerprint_models(cfg, sources) == first
    (reward / "source.txt").write_text("/runs/rm/checkpoint-000024\nabc\n")
    exported = _fingerprint_models(cfg, sources)
    (reward / "source.txt").write_text("/runs/rm/checkpoint-000024\ndef\n")  # saved again at the same path
    assert len({first, exported, _fingerprint_models(cfg, sources)}) == 3
    assert _fingerprint_models(replace(cfg, ppo=replace(cfg.ppo, kl_coef=0.2)), sources) != _fingerprint_models(
        cfg, sources)
    assert _fingerprint_models(replace(cfg, ppo=replace(cfg.ppo, samples_to_log=9)), sources) == _fingerprint_models(
        cfg, sources)
