"""The recipe of trainer_rl.py, PPO and GRPO: config -> prompts -> four models -> rollouts -> policy and value steps
-> checkpoints.

`train_rl(cfg, export)` wires these in order, around training/run.py's start-up, engines and exit (GRPO: one trained
engine, no value model, rewards from functions and/or the reward model, grpo.py's advantages and losses):
  1. process group, seeds, the policy's tokenizer; the reward and value models' folders (a trainer_rm.py checkpoint or
     run folder is exported once, training/start.py), each checked to share the policy's tokenizer; the prompts
     (data/prompts.py);
  2. the frozen models first, the reference (the starting policy) and the reward model: in the run's dtype, whole on
     every rank, or partitioned by ZeRO-3 inference engines (`ppo.frozen_zero3`); then the two trained engines, the
     policy and the value model (the reward model with its score head read per token, models/reward_head.py),
     each with its own gradient accumulation, learning rate and schedule;
  3. resume: both engines, the counters and the RNG states from one committed checkpoint, saved by as many ranks
     (resume.py; PPO does not resume on another number of ranks);
  4. the loop: each step samples `num_rollouts` continuations (rollouts.py), scores them with the four models,
     turns them into per-token rewards, advantages and returns (losses.py), then runs the policy's optimizer steps and
     the value model's; metrics, samples and checkpoints at their intervals, and a stop with a checkpoint after the
     step when a signal asks for one (preemption.py).

Schedules count optimizer steps: the policy takes policy_epochs * ppo_steps_per_epoch of them per PPO step and the
value model value_epochs * value_steps_per_epoch, and each engine's warm-up and decay are scaled by its own count,
so both follow `warmup_steps` and `lr_decay_steps` in PPO steps (the published recipe's "10 warm-up steps, cosine
over 100" for the policy, whose count is 1).

Losses are means over the continuation tokens of an optimizer step on all ranks: each micro-batch's token sum is
divided by the step's tokens on all ranks (and multiplied by the world size, which DeepSpeed's gradient averaging
divides by), however the rows fall into micro-batches. Each optimizer step goes through step.py's `optimizer_step`,
as SFT's do; what differs is around it: SFT's loop reads its losses late (`PendingLosses`) and counts a step with a
non-finite loss as skipped, where an engine skips it, while a PPO step holds several optimizer steps of two engines
whose denominators are counted before each one, and refuses any non-finite loss before its update (a skipped update
would leave the policy and the value model out of step with the rollouts they were scored on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig

from model_training.checkpoints.read import CheckpointError
from model_training.config import ConfigError, GrpoConfig, PpoConfig, TrainConfig, zero_stage
from model_training.console import ranks
from model_training.data.prompts import Prompt, load_prompts, prompts_digest
from model_training.layout import (
    MODEL_CONFIG_DIR,
    ROLLOUT_SAMPLES,
    START_REWARD_MODEL_DIR,
    START_VALUE_MODEL_DIR,
    TOKENIZER_DIR,
    VALUE_MODEL_DIR,
    record_run_file,
)
from model_training.models.builder import build_model, load_tokenizer
from model_training.models.reward_head import is_reward_model
from model_training.training.checkpoint import load_checkpoint
from model_training.training.distributed import DistInfo
from model_training.training.metrics import MetricsLogger
from model_training.training.ppo.grpo import (
    group_advantages,
    group_stats,
    k3,
    step_denominator,
    surrogate_sums,
    token_losses,
)
from model_training.training.ppo.losses import gae, policy_loss, token_rewards, value_loss, whiten
from model_training.training.ppo.rollouts import (
    Rollouts,
    check_same_tokenizer,
    decode_samples,
    decode_texts,
    draw_prompts,
    generate,
    sequence_scores,
    token_logprobs,
    token_values,
)
from model_training.training.preemption import StopRequest
from model_training.training.report import rl_line
from model_training.training.resume import Resume, already_complete, checkpoint_to_resume
from model_training.training.rewards import RewardError, RewardFunction, load_reward_functions, reward_values
from model_training.training.run import (
    FieldsState,
    LoopResult,
    StartupClock,
    build_engine,
    clear_earlier_run,
    launch,
    leave_process_group,
    logged_loop,
    record_config,
    start_run,
)
from model_training.training.saver import Saver
from model_training.training.start import (
    SOURCE_FILE,
    Exporter,
    model_folder,
    saved_folder,
    start_model_config,
    tokenizer_config,
)
from model_training.training.step import TrainingError, nonfinite_on_any_rank, optimizer_step

logger = logging.getLogger(__name__)

METRICS = ("reward", "kl", "entropy", "length", "policy_loss", "policy_clipfrac", "value_loss", "value_clipfrac")
GRPO_METRICS = ("reward", "reward_std", "flat_groups", "kl", "entropy", "length", "policy_loss", "clip_low_frac",
                "clip_high_frac")


@dataclass
class RlState(FieldsState):
    """Counters that a resume restores; the prompts of the next step follow from `step`."""

    step: int = 0
    """PPO steps done (rollouts, then the policy's and the value model's optimizer steps)."""
    generated_tokens: int = 0
    """Continuation tokens sampled, all ranks."""
    data_fingerprint: str = ""
    """The prompts and how they are drawn; a resume that would draw others is refused."""
    model_fingerprint: str = ""
    """The four models and PPO's options; a resume with others is refused."""


@dataclass(frozen=True)
class Plan:
    """How a step's rollouts split over optimizer steps, per rank."""

    rollouts: int
    """Rollouts per rank and step."""
    policy_rows: int
    """Rollouts per policy optimizer step, per rank."""
    value_rows: int
    """Rollouts per value optimizer step, per rank."""
    micro_batch: int
    """Rollouts per forward and backward."""


@dataclass(frozen=True)
class Models:
    policy: Any
    """The policy's DeepSpeed engine."""
    value: Any
    """The value model's DeepSpeed engine; None for GRPO."""
    reference: Any
    """The frozen starting policy: the model, or the ZeRO-3 inference engine that holds it partitioned; None for GRPO
    without a KL term."""
    reward: Any
    """The frozen reward model, held as the reference is; None for GRPO without one."""


def plan_steps(cfg: TrainConfig, world_size: int) -> Plan:
    """The split of each step's rollouts (`Plan`); ConfigError when they do not divide evenly."""
    ppo, micro = cfg.ppo, cfg.per_device_train_batch_size
    if ppo.num_rollouts % world_size:
        raise ConfigError(f"key 'ppo.num_rollouts' is {ppo.num_rollouts}, which {ranks(world_size)} cannot share "
                          "evenly; use a multiple of the number of ranks")
    rollouts = ppo.num_rollouts // world_size
    grpo = cfg.rl_algorithm == "grpo"
    if grpo and rollouts % cfg.grpo.group_size:
        raise ConfigError(f"key 'ppo.num_rollouts' is {ppo.num_rollouts}: each of the {world_size} ranks samples whole "
                          f"groups of 'grpo.group_size' ({cfg.grpo.group_size}); use a multiple of "
                          f"{cfg.grpo.group_size * world_size}")
    rows = {"value_steps_per_epoch": rollouts} if grpo else {}
    for key in ("ppo_steps_per_epoch",) if grpo else ("ppo_steps_per_epoch", "value_steps_per_epoch"):
        steps = getattr(ppo, key)
        if rollouts % steps or (rollouts // steps) % micro:
            raise ConfigError(
                f"each rank's {rollouts} rollouts per step do not split into 'ppo.{key}' ({steps}) optimizer steps of "
                f"whole micro-batches of 'per_device_train_batch_size' ({micro}); choose values that divide evenly")
        rows[key] = rollouts // steps
    return Plan(rollouts, rows["ppo_steps_per_epoch"], rows["value_steps_per_epoch"], micro)


def train_rl(cfg: TrainConfig, export: Exporter) -> Path:
    """Run the PPO training described by `cfg`; return the run folder. A signal stops it after the PPO step it is in
    with a checkpoint and raises `Stopped` (preemption.py). `export`: how a model given as a training checkpoint
    becomes a folder to load (training/start.py)."""
    if not cfg.ppo.reward_model and cfg.rl_algorithm == "ppo":  # a section may leave it to the command line
        raise ConfigError("key 'ppo.reward_model' is not set; trainer_rl.py needs a reward model (a trainer_rm.py "
                          "export, checkpoint or run folder)")
    return launch(cfg, partial(_train_rl, export=export))


def _train_rl(cfg: TrainConfig, stop: StopRequest, export: Exporter) -> Path:
    info, clock = start_run(cfg, True)
    output_dir = Path(cfg.output_dir)
    # Everything that can be checked without the exports is checked before their minutes (and their writes): a split
    # that does not fit, a reward function that does not import, a reward model of another tokenizer.
    plan = plan_steps(cfg, info.world_size)
    rewards = load_reward_functions(cfg.grpo.reward_functions) if cfg.rl_algorithm == "grpo" else []
    tokenizer = load_tokenizer(tokenizer_config(cfg))
    _check_reward_and_value_models(cfg, tokenizer)
    prompts = load_prompts(cfg, tokenizer)
    sources = _model_sources(cfg, info, export)
    steps_per_epoch = math.ceil(len(prompts) / cfg.ppo.num_rollouts)
    total_steps = cfg.max_steps or math.ceil(cfg.num_train_epochs * steps_per_epoch)
    clock.phase("prompts", f"{len(prompts)} prompts, {total_steps} steps of {cfg.ppo.num_rollouts} rollouts")
    state = RlState(data_fingerprint=_fingerprint_data(prompts, cfg.ppo.num_rollouts, cfg.rng_seed),
                    model_fingerprint=_fingerprint_models(cfg, sources))
    resume = _checkpoint_to_continue(cfg, state, output_dir)
    if resume is not None and already_complete(cfg, resume, resume.saved["step"], total_steps):
        leave_process_group()
        return output_dir
    clear_earlier_run(cfg, info)

    models = _build_models(cfg, sources, tokenizer, info, plan, total_steps, clock)
    record_config(cfg, info)
    value_engine = {VALUE_MODEL_DIR: models.value} if models.value is not None else None
    write_more = (lambda folder: _write_value_config(models, folder)) if models.value is not None else None
    saver = Saver(cfg, tokenizer, total_steps, steps_per_epoch, write_more=write_more, more_engines=value_engine)
    if resume is not None:
        try:
            state.load_state_dict(load_checkpoint(models.policy, resume.checkpoint, more_engines=value_engine))
        except CheckpointError as err:
            raise ConfigError(f"cannot resume from {resume.checkpoint}: {err}") from None
        clock.phase("resume", f"from {resume.checkpoint} at step {state.step}")
    tokens_before = state.generated_tokens

    def loop(metrics: MetricsLogger) -> LoopResult:
        _loop(cfg, models, state, PpoRun(prompts, plan, tokenizer, saver, metrics, info, total_steps, stop, rewards))
        # Its tokens/s: the continuations generated.
        return LoopResult(state.step, state.generated_tokens - tokens_before)

    logged_loop(cfg, info, loop)
    return output_dir


def _checkpoint_to_continue(cfg: TrainConfig, state: RlState, output_dir: Path) -> Resume | None:
    """The checkpoint to resume from, if asked (resume.py checks it); ConfigError when another number of ranks saved
    it: PPO's two engines resume on the number of ranks that saved them."""
    if not cfg.resume_from_checkpoint:
        return None
    resume = checkpoint_to_resume(cfg, state, output_dir)
    if resume.world_size != dist.get_world_size():
        saved = ranks(resume.world_size)
        raise ConfigError(f"cannot resume from {resume.checkpoint}: it was saved by {saved} and this run has "
                          f"{dist.get_world_size()}; PPO resumes on the number of ranks that saved it (only SFT, the "
                          f"reward model and DPO resume on another): resume with {saved}")
    return resume


def _fingerprint_data(prompts: list[Prompt], num_rollouts: int, seed: int) -> str:
    return hashlib.sha256(repr((prompts_digest(prompts), num_rollouts, seed)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelSources:
    """Where each of the four models is loaded from."""

    policy: TrainConfig
    """The run's config with `model_name` the policy's folder (also the reference's)."""
    reward: str | None
    """None for GRPO without a reward model."""
    value: str | None
    """None for GRPO."""


def _model_sources(cfg: TrainConfig, info: DistInfo, export: Exporter) -> ModelSources:
    """The four models' folders, a training checkpoint or run folder exported once (training/start.py)."""
    policy = start_model_config(cfg, info, export)
    if not cfg.ppo.reward_model:  # GRPO on reward functions alone (train_rl and the config checks allow no other)
        return ModelSources(policy, None, None)
    reward = model_folder(cfg.ppo.reward_model, "ppo.reward_model", START_REWARD_MODEL_DIR, cfg, info, export)
    value = None
    if cfg.rl_algorithm == "ppo":
        value = reward if cfg.ppo.value_model is None else model_folder(
            cfg.ppo.value_model, "ppo.value_model", START_VALUE_MODEL_DIR, cfg, info, export)
    return ModelSources(policy, reward, value)


def _check_reward_and_value_models(cfg: TrainConfig, tokenizer: Any) -> None:
    """ConfigError when the reward model is not one, or the reward or value model has another tokenizer than the
    policy's: read where they lie (a training checkpoint's own folders), before anything is exported."""
    if not cfg.ppo.reward_model:  # GRPO on reward functions alone
        return
    reward = saved_folder(cfg.ppo.reward_model, "ppo.reward_model", MODEL_CONFIG_DIR)
    try:
        config = AutoConfig.from_pretrained(reward, cache_dir=cfg.cache_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"key 'ppo.reward_model': cannot load {reward}: {err}") from None
    if not is_reward_model(config):
        raise ConfigError(f"key 'ppo.reward_model': {reward} is a {', '.join(config.architectures or ['model'])}, not "
                          "a reward model (a *ForSequenceClassification, as trainer_rm.py trains and exports)")
    check_same_tokenizer(tokenizer, saved_folder(cfg.ppo.reward_model, "ppo.reward_model", TOKENIZER_DIR),
                         "ppo.reward_model")
    if cfg.ppo.value_model not in (None, cfg.ppo.reward_model):
        check_same_tokenizer(tokenizer, saved_folder(cfg.ppo.value_model, "ppo.value_model", TOKENIZER_DIR),
                             "ppo.value_model")


def _fingerprint_models(cfg: TrainConfig, sources: ModelSources) -> str:
    """The four models' sources (a local folder by its files' names and sizes, its config and where it was exported
    from: a reference or reward model exported anew from another checkpoint is another run) and every option of the
    objective (not how many samples are logged, nor where the frozen models sit)."""
    options = {k: v for k, v in asdict(cfg.ppo).items() if k not in ("samples_to_log", "frozen_zero3")}
    if cfg.rl_algorithm == "grpo":  # only then: the fingerprints of earlier PPO runs stay what they were
        options["grpo"] = sorted(asdict(cfg.grpo).items())
    digest = hashlib.sha256(repr(("rl", sorted(options.items()))).encode())
    for name in (sources.policy.model_name, sources.reward, sources.value):
        if name is None:
            continue
        folder = Path(name)
        if not folder.is_dir():  # a hub id
            digest.update(name.encode())
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}".encode())
            if path.name in ("config.json", SOURCE_FILE):
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _build_models(
    cfg: TrainConfig, sources: ModelSources, tokenizer: Any, info: DistInfo, plan: Plan, total_steps: int,
    clock: StartupClock,
) -> Models:
    """The four models (module docstring, 2), or GRPO's: the policy, and the reference and reward model where its KL
    term and rewards read them; the frozen ones first, while no ZeRO-3 build is alive."""
    ppo, model_cfg, grpo = cfg.ppo, sources.policy, cfg.rl_algorithm == "grpo"
    reward_cfg = replace(model_cfg, model_name=sources.reward, tokenizer_name=None)
    reference = None if grpo and not cfg.grpo.kl_coef else _frozen(model_cfg, tokenizer, ppo.frozen_zero3)
    reward = None if sources.reward is None else _frozen(reward_cfg, tokenizer, ppo.frozen_zero3, reward_head=True)
    clock.phase("frozen models", "partitioned (ZeRO-3 inference)" if ppo.frozen_zero3 else f"whole, {cfg.dtype}")
    policy_steps = ppo.policy_epochs * ppo.ppo_steps_per_epoch
    policy = build_engine(_trained(model_cfg, plan.policy_rows, plan.micro_batch, policy_steps, cfg.learning_rate),
                          tokenizer, info, total_steps * policy_steps, clock)
    if grpo:
        clock.phase("engines", f"policy on ZeRO stage {zero_stage(policy.config)}")
        return Models(policy, None, reference, reward)
    value_steps = ppo.value_epochs * ppo.value_steps_per_epoch
    value_cfg = replace(reward_cfg, model_name=sources.value)
    value = build_engine(_trained(value_cfg, plan.value_rows, plan.micro_batch, value_steps,
                                  ppo.value_learning_rate or cfg.learning_rate),
                         tokenizer, info, total_steps * value_steps, clock, reward_head=True)
    clock.phase("engines", f"policy and value on ZeRO stage {zero_stage(policy.config)}")
    return Models(policy, value, reference, reward)


def _trained(
    cfg: TrainConfig, rows: int, micro_batch: int, steps_per_ppo_step: int, learning_rate: float
) -> TrainConfig:
    """`cfg` for one trained engine: its accumulation, learning rate, and its schedule in its own optimizer steps."""
    decay = None if cfg.lr_decay_steps is None else cfg.lr_decay_steps * steps_per_ppo_step
    return replace(cfg, gradient_accumulation_steps=rows // micro_batch, learning_rate=learning_rate,
                   warmup_steps=cfg.warmup_steps * steps_per_ppo_step, lr_decay_steps=decay)


def _frozen(cfg: TrainConfig, tokenizer: Any, partitioned: bool, reward_head: bool = False) -> Any:
    """A model that is only read: whole on this rank, or partitioned over the ranks by a ZeRO-3 engine without an
    optimizer, whose hooks gather each layer's weights for its forward. The engine itself is returned: once it is
    collected, it removes those hooks."""
    if not partitioned:
        return build_model(cfg, tokenizer, {}, reward_head=reward_head).requires_grad_(False).eval()
    ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
                 "gradient_accumulation_steps": 1, "bf16": {"enabled": cfg.dtype == "bf16"},
                 "fp16": {"enabled": cfg.dtype == "fp16"}}
    model = build_model(cfg, tokenizer, ds_config, reward_head=reward_head).requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def _write_value_config(models: Models, folder: Path) -> None:
    models.value.module.config.save_pretrained(folder / VALUE_MODEL_DIR / MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class PpoRun:
    """What the PPO loop reads and writes besides the models and the counters."""

    prompts: list[Prompt]
    plan: Plan
    tokenizer: Any
    saver: Saver
    metrics: MetricsLogger
    info: DistInfo
    total_steps: int
    stop: StopRequest
    rewards: list[RewardFunction]
    """GRPO's reward functions; empty for PPO."""


def _loop(cfg: TrainConfig, models: Models, state: RlState, run: PpoRun) -> None:
    """PPO steps up to the last; after each, the ranks agree whether a signal asked for a stop (one all-reduce of one
    number): the step is then logged and saved, and `Stopped` raised."""
    progress = tqdm(total=run.total_steps, initial=state.step, disable=not run.info.is_main, dynamic_ncols=True)
    if run.stop.agreed():  # asked while starting: nothing trained since the checkpoint the run started from
        run.stop.stopped(state.step, None)
    while state.step < run.total_steps:
        if cfg.rl_algorithm == "grpo":
            record, rollouts = _grpo_step(cfg, models, state.step, run)
        else:
            record, rollouts = _ppo_step(cfg, models, state.step, run.prompts, run.plan, run.tokenizer, run.info)
        state.step += 1
        state.generated_tokens += record.pop("generated_tokens")
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', 0.0):.3f}")
        stopping = run.stop.agreed()
        if stopping or state.step == run.total_steps or state.step % cfg.logging_steps == 0:
            lrs = {"lr": models.policy.get_lr()[0]}
            if models.value is not None:
                lrs["value_lr"] = models.value.get_lr()[0]
            run.metrics.log({"step": state.step, **record, "tokens": state.generated_tokens, **lrs})
            if run.info.is_main:
                progress.write(rl_line(state.step, record))
            _log_samples(rollouts, run.tokenizer, cfg.ppo.samples_to_log, run.metrics, state.step)
        save_now = run.saver.due(state.step) or (stopping and run.saver.enabled)
        saved = run.saver.save(models.policy, state.step, state.state_dict()) if save_now else None
        if stopping:
            run.stop.stopped(state.step, saved)
    progress.close()


def _ppo_step(
    cfg: TrainConfig, models: Models, step: int, prompts: list[Prompt], plan: Plan, tokenizer: Any, info: DistInfo,
) -> tuple[dict[str, Any], Rollouts]:
    """One PPO step (0-based `step`): rollouts, scores, advantages, the optimizer steps; its metrics, all ranks."""
    ppo, start = cfg.ppo, time.perf_counter()
    mine = draw_prompts(prompts, step, ppo.num_rollouts, cfg.rng_seed, info.rank, info.world_size)
    rollouts = _sample(ppo, cfg.rng_seed, models, step, mine, tokenizer, info)
    generated = time.perf_counter()
    entropy = _score(models, rollouts, ppo, tokenizer.pad_token_id)
    mask = rollouts.mask.float()
    rewards, kl = token_rewards(rollouts.scores, rollouts.logprobs, rollouts.ref_logprobs, mask, ppo.kl_coef,
                                ppo.score_on_eod)
    if ppo.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, total=_all_ranks)
    advantages, returns = gae(rewards, rollouts.values, mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = whiten(advantages, mask, total=_all_ranks)
    scored = time.perf_counter()
    seed = [cfg.rng_seed, step]
    policy_sums = _update(models.policy, rollouts, advantages, ppo.policy_epochs, plan.policy_rows, plan.micro_batch,
                          [*seed, 0], lambda engine, part, target: _policy_sums(engine, part, target, ppo))
    value_sums = _update(models.value, rollouts, returns, ppo.value_epochs, plan.value_rows, plan.micro_batch,
                         [*seed, 1], lambda engine, part, target: _value_sums(engine, part, target, ppo))
    trained = time.perf_counter()
    # One all-reduce for every metric: each rank's sums, then the means over all ranks.
    rows = torch.tensor(float(len(rollouts.sources)), device=mask.device)
    trained_tokens = rollouts.attention_mask.sum() * (ppo.policy_epochs + ppo.value_epochs)
    found = torch.stack([rollouts.scores.sum(), kl.sum(), (entropy * mask).sum(), mask.sum(), rows,
                         trained_tokens.float()]).double()
    sums = _all_ranks(torch.cat([found, policy_sums, value_sums])).tolist()
    score, kl_sum, entropy_sum, tokens, rows, trained_tokens, p_loss, p_clip, p_tokens, v_loss, v_clip, v_tokens = sums
    values = [score / rows, kl_sum / rows, entropy_sum / tokens, tokens / rows, p_loss / p_tokens, p_clip / p_tokens,
              v_loss / v_tokens, v_clip / v_tokens]
    record = dict(zip(METRICS, values, strict=True))
    record.update(rollout_tokens_per_s=tokens / (generated - start),
                  train_tokens_per_s=trained_tokens / (trained - scored), generated_tokens=int(tokens))
    return record, rollouts


def _sample(ppo: PpoConfig, seed: int, models: Models, step: int, prompts: list[Prompt], tokenizer: Any,
            info: DistInfo) -> Rollouts:
    """A continuation of each of this rank's prompts from the policy."""
    # Each rank samples from its own seed, drawn from the step: the ranks' continuations are independent, and a resume
    # samples what the run would have.
    device = models.policy.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(np.random.SeedSequence([seed, step, info.rank]).generate_state(1)[0]))
        return generate(models.policy.module, prompts, ppo, tokenizer,
                        partitioned=zero_stage(models.policy.config) == 3)


def _grpo_step(cfg: TrainConfig, models: Models, step: int, run: PpoRun) -> tuple[dict[str, Any], Rollouts]:
    """One GRPO step (0-based `step`): `group_size` continuations of each of this rank's prompts, their rewards and
    group-relative advantages (grpo.py), the policy's optimizer steps; its metrics, all ranks."""
    ppo, grpo, start = cfg.ppo, cfg.grpo, time.perf_counter()
    size = grpo.group_size
    drawn = draw_prompts(run.prompts, step, ppo.num_rollouts // size, cfg.rng_seed, run.info.rank,
                         run.info.world_size)
    # A group's continuations are consecutive rows of one rank: its advantages need no other rank.
    mine = [prompt for prompt in drawn for _ in range(size)]
    rollouts = _sample(cfg.ppo, cfg.rng_seed, models, step, mine, run.tokenizer, run.info)
    generated = time.perf_counter()
    entropy = _score(models, rollouts, cfg.ppo, run.tokenizer.pad_token_id)
    values = _reward_values(run.rewards, mine, rollouts, run.tokenizer)
    weights = torch.tensor([f.weight for f in run.rewards], dtype=torch.float64)
    rewards = weights @ values  # (0,) @ (0, rows): zeros, when the reward model alone rewards
    if rollouts.scores is not None:
        values = torch.cat([values, rollouts.scores.double().cpu().unsqueeze(0)])
        rewards = rewards + grpo.reward_model_weight * values[-1]
    advantages = group_advantages(rewards, size, grpo.scale_rewards).to(rollouts.mask.device)
    rollouts.scores = rewards  # the samples table's score: the reward trained on
    scored = time.perf_counter()
    denominator = partial(step_denominator, normalization=grpo.loss_normalization, max_new_tokens=ppo.max_new_tokens)
    policy_sums = _update(models.policy, rollouts, advantages, ppo.policy_epochs, run.plan.policy_rows,
                          run.plan.micro_batch, [cfg.rng_seed, step, 0],
                          lambda engine, part, target: _grpo_sums(engine, part, target, cfg.grpo, cfg.ppo), denominator)
    trained = time.perf_counter()
    # One all-reduce for every metric: each rank's sums, then the means over all ranks.
    mask = rollouts.mask.double()
    spread, flat = group_stats(rewards, size)
    kl = k3(rollouts.logprobs, rollouts.ref_logprobs) if rollouts.ref_logprobs is not None else torch.zeros_like(mask)
    found = torch.stack([rewards.sum(), spread, flat.double(), (kl * mask).sum().cpu(), (entropy * mask).sum().cpu(),
                         mask.sum().cpu(), torch.tensor(float(len(mine)))]).double()
    sums = _all_ranks(torch.cat([found, values.sum(dim=1), policy_sums.cpu()]).to(mask.device)).tolist()
    reward, spread, flat, kl_sum, entropy_sum, tokens, rows = sums[:7]
    per_source, (numerator, denominator_sum, low, high, trained_tokens) = sums[7:-5], sums[-5:]
    groups = rows / size
    record = dict(zip(GRPO_METRICS, [reward / rows, spread / groups, flat / groups, kl_sum / tokens,
                                     entropy_sum / tokens, tokens / rows, numerator / denominator_sum,
                                     low / trained_tokens, high / trained_tokens], strict=True))
    if models.reference is None:
        del record["kl"]  # no reference to measure it against
    names = [f"reward/{f.path.rpartition(':')[2]}" for f in run.rewards]
    names += ["reward/reward_model"] if len(per_source) > len(names) else []
    record.update({name: total / rows for name, total in zip(names, per_source, strict=True)})
    record.update(rollout_tokens_per_s=tokens / (generated - start),
                  train_tokens_per_s=trained_tokens / (trained - scored), generated_tokens=int(tokens))
    return record, rollouts


def _reward_values(functions: list[RewardFunction], prompts: list[Prompt], rollouts: Rollouts,
                   tokenizer: Any) -> torch.Tensor:
    """(functions, rows) values of the reward functions (rewards.py), float64 on the CPU. When one fails on any rank,
    every rank stops before the update: that rank with the function's line, the others saying where to look."""
    texts = decode_texts(rollouts, tokenizer)
    failure = ""
    try:
        table = reward_values(functions, [p for p, _ in texts], [c for _, c in texts],
                              [dict(p.fields) for p in prompts], rollouts.sources)
    except RewardError as err:
        failure, table = str(err), []
    failed = _all_ranks(torch.tensor(float(bool(failure)), device=rollouts.mask.device)).item()
    if failure:
        raise TrainingError(f"{failure}; the step is not applied")
    if failed:
        raise TrainingError("a reward function failed on another rank (its line is above); the step is not applied")
    return torch.tensor(table, dtype=torch.float64).reshape(len(functions), len(prompts))


def _grpo_sums(engine: Any, part: Rollouts, advantages: torch.Tensor, grpo: GrpoConfig, ppo: PpoConfig) -> torch.Tensor:
    """A micro-batch's (loss numerator, its denominator, tokens clipped low, clipped high, tokens)."""
    logprobs, _ = token_logprobs(engine, part, ppo.temperature)
    mask = part.mask.to(logprobs.dtype)
    losses, low, high = token_losses(logprobs, part.logprobs, part.ref_logprobs, advantages, grpo.clip_low,
                                     grpo.clip_high, grpo.kl_coef)
    numerator = surrogate_sums(losses, mask, grpo.loss_normalization)
    denominator = step_denominator(mask, grpo.loss_normalization, ppo.max_new_tokens).to(logprobs.dtype)
    return torch.stack([numerator, denominator, (low * mask).sum(), (high * mask).sum(), mask.sum()])


def _all_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks."""
    t = t.clone()
    dist.all_reduce(t)
    return t


@torch.no_grad()
def _score(models: Models, rollouts: Rollouts, ppo: PpoConfig, pad_id: int) -> torch.Tensor:
    """Fill in what the models say of the rollouts (each one that the run holds), in chunks of `rollout_batch_size`
    rows; the (B, T) entropy of the policy at each continuation token."""
    width = rollouts.mask.shape[1]
    per_token: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    scores = []
    trained = [engine for engine in (models.policy, models.value) if engine is not None]
    for engine in trained:
        engine.eval()
    for start in range(0, len(rollouts.sources), ppo.rollout_batch_size):
        part = rollouts.rows(slice(start, start + ppo.rollout_batch_size))
        logprobs, entropy = token_logprobs(models.policy, part, ppo.temperature, entropy=True)
        found = {"logprobs": logprobs, "entropy": entropy}
        if models.value is not None:
            found["values"] = token_values(models.value, part)
        if models.reference is not None:
            found["ref_logprobs"] = token_logprobs(models.reference, part, ppo.temperature)[0]
        for key, value in found.items():
            per_token[key].append(F.pad(value, (0, width - value.shape[1])))
        if models.reward is not None:
            scores.append(sequence_scores(models.reward, part, pad_id))
    for engine in trained:
        engine.train()
    rollouts.logprobs, rollouts.ref_logprobs, rollouts.values = (
        torch.cat(per_token[key]) if per_token[key] else None for key in ("logprobs", "ref_logprobs", "values"))
    rollouts.scores = torch.cat(scores) if scores else None
    return torch.cat(per_token["entropy"])


SumsOf = Callable[[Any, Rollouts, torch.Tensor], torch.Tensor]


def _tokens(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().double()


def _update(
    engine: Any, rollouts: Rollouts, target: torch.Tensor, epochs: int, rows_per_step: int, micro_batch: int,
    seed: list[int], sums_of: SumsOf, denominator: Callable[[torch.Tensor], torch.Tensor] = _tokens,
) -> torch.Tensor:
    """`epochs` passes of optimizer steps of `engine` over the rollouts, `rows_per_step` rows each (the rows shuffled
    anew each pass, seeded by `seed`), in micro-batches, each through step.py's `optimizer_step` as SFT's are; this
    rank's sums of what `sums_of(engine, rows, their target rows)` gives of each micro-batch, its first entry the
    loss's numerator. The loss of an optimizer step is the numerators' sum over its rows on all ranks divided by
    `denominator(the mask of those rows)` summed likewise: the continuation tokens for PPO, GRPO's normalization
    (grpo.py)."""
    world, totals = dist.get_world_size(), None
    refuse = partial(_refuse_nonfinite, engine=engine)
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng([*seed, epoch]).permutation(len(rollouts.sources)))
        for first in range(0, len(order), rows_per_step):
            rows = order[first : first + rows_per_step]
            # Counted on all ranks before the first backward: every micro-batch's loss is a share of the one mean.
            whole = _all_ranks(denominator(rollouts.mask[rows]))
            chunks = (rows[i : i + micro_batch] for i in range(0, len(rows), micro_batch))
            step_sums = optimizer_step(
                engine, (sums_of(engine, rollouts.rows(chosen), target[chosen]) for chosen in chunks), world, whole,
                refuse)
            totals = step_sums + (0 if totals is None else totals)
    return totals


def _refuse_nonfinite(loss_sum: torch.Tensor, engine: Any) -> None:
    """Stop before an update from a non-finite loss on any rank, whatever the engine would do with it (a host sync
    per optimizer step; PPO's steps are few and long): PPO has no skipped steps to count, as SFT's loop has."""
    if not nonfinite_on_any_rank(loss_sum):
        return
    raise TrainingError(f"non-finite loss in an optimizer step of the {type(engine.module).__name__}; training "
                        "stops before the update; lower the learning rate, then resume from the last checkpoint")


def _policy_sums(engine: Any, part: Rollouts, advantages: torch.Tensor, ppo: PpoConfig) -> torch.Tensor:
    logprobs, _ = token_logprobs(engine, part, ppo.temperature)
    mask = part.mask.to(logprobs.dtype)
    advantages = advantages[:, : mask.shape[1]]
    loss, clipfrac = policy_loss(logprobs, part.logprobs, advantages, mask, ppo.clip_policy)
    tokens = mask.sum()
    return torch.stack([loss * tokens, clipfrac * tokens, tokens])


def _value_sums(engine: Any, part: Rollouts, returns: torch.Tensor, ppo: PpoConfig) -> torch.Tensor:
    values = token_values(engine, part)
    mask = part.mask.to(values.dtype)
    returns = returns[:, : mask.shape[1]]
    loss, clipfrac = value_loss(values, part.values, returns, mask, ppo.clip_value)
    tokens = mask.sum()
    return torch.stack([loss * tokens, clipfrac * tokens, tokens])


def _log_samples(rollouts: Rollouts, tokenizer: Any, count: int, metrics: MetricsLogger, step: int) -> None:
    """Rank 0's first `count` rollouts of the step: a line each in the run folder's rollout_samples.jsonl, and a wandb
    table."""
    rows = decode_samples(rollouts, tokenizer, count)
    if not metrics.enabled or not rows:
        return
    with open(record_run_file(metrics.path.parent, ROLLOUT_SAMPLES), "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n" for row in rows)
    columns = list(rows[0])
    metrics.log_table("samples", columns, [[row[c] for c in columns] for row in rows], step)
