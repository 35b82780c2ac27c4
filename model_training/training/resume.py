"""What a resume continues from, and what it changes: the checkpoint's checks before anything is built, the schedule's
length, the data position, the conversion for another number of ranks, and the one line that says what differs.

What carries over, and under which change (the README's "Checkpoints and resume" says it for users):
- the same command: everything, bit for bit on the CPU (model, optimizer, schedule, counters, data position, every
  rank's RNG states);
- another number of ranks (ZeRO-1/2/3 through the universal conversion of reshard.py; the plain PyTorch engine, whose
  state is every rank's, as it is): the weights, the optimizer's moments and step, the schedule, the counters and the
  data position; each rank's RNG streams are derived anew from the seed, the step and the rank (checkpoint.seed_rank);
- another global batch (micro batch x accumulation x ranks): the same, and the data goes on from the samples already
  read (sampler.DataPosition); the schedule keeps its length in optimizer steps, since `num_train_epochs` counts the
  epochs of the global batch the run started with (`TrainerState.epoch_steps`);
- another `num_train_epochs` or `max_steps`: the schedule is stretched to the new length, and the learning rate of the
  next step moves with it (said on the line);
- another `learning_rate`, betas, eps or weight decay: the config's values win, each change logged.
Other data, another model or the other engine (DeepSpeed or not) is refused before anything is built or written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from model_training.checkpoints.read import (
    CheckpointError,
    checkpoint_bytes,
    read_trainer_state,
    resolve_checkpoint,
    verify_checkpoint,
    verify_hashes_on_ranks,
)
from model_training.config import ConfigError, TrainConfig, read_deepspeed_json, read_run_config, zero_stage
from model_training.console import ranks
from model_training.layout import RUN_CONFIG, zero3_model_states
from model_training.training.reshard import convert_for_any_ranks, needs_universal
from model_training.training.step_plan import DataPosition, StepPlan
from model_training.training.torch_engine import holds_torch_engine_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    """A committed checkpoint this run continues from, checked (`checkpoint_to_resume`) before anything is built."""

    checkpoint: Path
    saved: dict[str, Any]
    """Its trainer_state.json: SFT's and the preference stages' TrainerState, or PPO's RlState."""
    world_size: int
    """The number of ranks that saved it."""
    universal: bool
    """Its engine state is cut per rank for another number of ranks: it loads through the universal conversion, and
    the engines are built with DeepSpeed's `load_universal` (reshard.py)."""


def checkpoint_to_resume(
    cfg: TrainConfig, state: Any, output_dir: Path, fingerprint_for_batch: Callable[[int], str] | None = None
) -> Resume:
    """The committed checkpoint to continue from, checked before anything is built: it must exist and verify (every
    file against its manifest's hash, the ranks sharing the work, unless `verify_checkpoint_hashes` is off), have
    been saved by the same engine (DeepSpeed or not), and train the same model on the same data in the same order:
    `state`'s data_fingerprint and model_fingerprint (TrainerState's, or PPO's). Call on every rank.

    `fingerprint_for_batch(b)`: the data fingerprint this run would have with a global batch of b samples (SFT and the
    preference stages); with it, a checkpoint whose global batch differs is accepted when its fingerprint is that of
    the same data with its own batch."""
    try:
        ckpt = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume ('resume_from_checkpoint'): {err}") from None
    try:
        if holds_torch_engine_state(ckpt) == cfg.deepspeed:
            saved_by, setting = ("without", "deepspeed=false") if cfg.deepspeed else ("on", "deepspeed=true")
            raise CheckpointError(f"it was saved by a run {saved_by} DeepSpeed, whose engine state this run cannot "
                                  f"load; resume it with {setting}")
        saved = read_trainer_state(ckpt)
        manifest = verify_checkpoint(ckpt)
        world_size = manifest["world_size"]
        if cfg.deepspeed:
            _check_same_engine_layout(cfg, ckpt, manifest["deepspeed_tag"])
    except CheckpointError as err:
        raise ConfigError(f"cannot resume from {ckpt}: {err}") from None
    _check_fingerprints(ckpt, saved, state, fingerprint_for_batch)
    if cfg.verify_checkpoint_hashes:
        _verify_on_ranks(ckpt)
    return Resume(ckpt, saved, world_size, needs_universal(ckpt, dist.get_world_size()))


def _check_same_engine_layout(cfg: TrainConfig, ckpt: Path, tag: str) -> None:
    """CheckpointError when DeepSpeed would look for the engine state in files the checkpoint does not have: ZeRO-3
    keeps each rank's model states apart, ZeRO-1/2 in one file; a bf16 run keeps its optimizer in other files than an
    fp16 or fp32 one (DeepSpeed's AssertionError or FileNotFoundError, deep in the load, otherwise)."""
    saved_stage3 = (ckpt / tag / zero3_model_states(0)).is_file()
    zero = zero_stage(read_deepspeed_json(cfg.deepspeed_config)[1])
    if saved_stage3 != (zero == 3):
        saved = "ZeRO-3" if saved_stage3 else "ZeRO-1/2"
        raise CheckpointError(
            f"it was saved under {saved}, and deepspeed_config '{cfg.deepspeed_config}' asks for ZeRO-{zero}, whose "
            f"engine state DeepSpeed keeps in other files; resume it with a {saved} deepspeed_config, or export it and "
            "start a new run from the export")
    try:
        saved_dtype = read_run_config(ckpt / RUN_CONFIG).dtype
    except ConfigError:  # a config of an older schema: the load says what it misses
        return
    if saved_dtype != cfg.dtype and "bf16" in (saved_dtype, cfg.dtype):
        raise CheckpointError(
            f"it was saved by a run with dtype {saved_dtype}, and this one has dtype {cfg.dtype}: DeepSpeed keeps "
            f"the optimizer state of bf16 and of other runs in other files; resume it with dtype={saved_dtype}")


def _check_fingerprints(
    ckpt: Path, saved: dict[str, Any], state: Any, fingerprint_for_batch: Callable[[int], str] | None
) -> None:
    for key, what in (("data_fingerprint", "training data or its order"), ("model_fingerprint", "model")):
        if saved[key] == getattr(state, key):
            continue
        if key == "data_fingerprint" and fingerprint_for_batch is not None:
            batch = saved_global_batch(ckpt, saved)
            if batch != state.samples_per_step and fingerprint_for_batch(batch) == saved[key]:
                continue  # the same data in the same order, read in global batches of another size
        raise ConfigError(
            f"cannot resume from {ckpt}: the {what} differs from the checkpoint's ({saved[key]} there, "
            f"{getattr(state, key)} now); start a new run in another output_dir"
        )


def saved_global_batch(ckpt: Path, saved: dict[str, Any]) -> int:
    """The global batch of a checkpoint's steps: saved in its trainer state, or (checkpoints from before it was) its
    config's micro batch x accumulation x the ranks that saved it."""
    if saved.get("samples_per_step"):
        return int(saved["samples_per_step"])
    run = read_run_config(ckpt / RUN_CONFIG)
    return run.per_device_train_batch_size * run.gradient_accumulation_steps * verify_checkpoint(ckpt)["world_size"]


def _verify_on_ranks(ckpt: Path) -> None:
    try:
        seconds = verify_hashes_on_ranks(ckpt)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume from {ckpt}: {err}") from None
    gigabytes = checkpoint_bytes(ckpt) / 1e9
    logger.info(
        "every file of %s matches its manifest's hash: %.2f GB in %.1f s on %s (%.0f MB/s)",
        ckpt, gigabytes, seconds, ranks(dist.get_world_size()), gigabytes * 1e3 / max(seconds, 1e-9),
    )


def convert_if_needed(cfg: TrainConfig, resume: Resume) -> None:
    """When the number of ranks changed and the engine state is cut per rank: its universal conversion, made now by
    every rank together or reused (reshard.py). Call on every rank, after `checkpoint_to_resume`."""
    if not resume.universal:
        return
    try:
        seconds = convert_for_any_ranks(resume.checkpoint, [resume.checkpoint], cfg.verify_checkpoint_hashes)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume from {resume.checkpoint} on {ranks(dist.get_world_size())}: {err}") from None
    logger.info("resharding: the checkpoint of %s loads on %d through its universal conversion (%.1f s)",
                ranks(resume.world_size), dist.get_world_size(), seconds)


@dataclass(frozen=True)
class Schedule:
    """The run's length in optimizer steps, and the steps of one epoch it counts `num_train_epochs` in."""

    total_steps: int
    epoch_steps: int


def schedule(cfg: TrainConfig, plan: StepPlan, resume: Resume | None) -> Schedule:
    """`max_steps`, else `num_train_epochs` epochs of the global batch the run started with (a fraction trains that
    share of the first epoch's steps, as OpenAssistant's num_train_epochs: 0.2 does)."""
    epoch_steps = (resume.saved.get("epoch_steps") if resume else None) or plan.steps_per_epoch
    return Schedule(cfg.max_steps or math.ceil(epoch_steps * cfg.num_train_epochs), epoch_steps)


def already_complete(cfg: TrainConfig, resume: Resume, step: int, total_steps: int) -> bool:
    """Whether the checkpoint's run had already reached its last step (`step` of `total_steps`); says so. A schedule
    shorter than the checkpoint's steps is a mistake: ConfigError (nothing would train, nothing be said)."""
    if step < total_steps:
        return False
    if step > total_steps:
        key, value = ("max_steps", cfg.max_steps) if cfg.max_steps else ("num_train_epochs", cfg.num_train_epochs)
        raise ConfigError(f"key '{key}' is {value}, which ends the schedule at step {total_steps}, but "
                          f"{resume.checkpoint} is at step {step}; set max_steps to more than {step} to train on, or "
                          "leave it out to resume the run as it was")
    logger.info("already complete at step %d (its schedule has %d steps): nothing to train; %s holds the final state",
                step, total_steps, resume.checkpoint)
    return True


def continued_plan(plan: StepPlan, resume: Resume) -> StepPlan:
    """`plan` starting where the checkpoint's steps stopped reading: the same samples as an uninterrupted run when the
    global batch is the same; with another, the rest of the epoch from the first sample not read yet."""
    saved = resume.saved
    if "data_epoch" not in saved:  # saved before positions were: its global batch is this run's (fingerprint)
        return plan
    return replace(plan, start=DataPosition(saved["optimizer_step"], saved["data_epoch"], saved["data_offset"]))


def describe_changes(cfg: TrainConfig, resume: Resume, plan: StepPlan, total_steps: int) -> list[str]:
    """What differs from the checkpoint's run in the number of ranks, the global batch and the schedule's length."""
    saved, changes = resume.saved, []
    world = dist.get_world_size()
    if resume.world_size != world:
        changes.append(f"{resume.world_size} -> {ranks(world)}")
    batch = saved_global_batch(resume.checkpoint, saved)
    if batch != plan.samples_per_step:
        changes.append(
            f"global batch {batch} -> {plan.samples_per_step} samples (micro batch {cfg.per_device_train_batch_size} x "
            f"accumulation {cfg.gradient_accumulation_steps} x {ranks(world)}), the data going on from sample "
            f"{plan.start.offset} of epoch {plan.start.epoch}")
    elif resume.world_size != world:
        changes.append(f"global batch unchanged ({batch} samples)")
    if saved.get("total_steps") and saved["total_steps"] != total_steps:
        changes.append(f"schedule {saved['total_steps']} -> {total_steps} optimizer steps")
    elif batch != plan.samples_per_step:
        changes.append(f"schedule unchanged ({total_steps} optimizer steps)")
    return changes


SCHEDULE_KEYS = ("lr_scheduler_type", "warmup_steps", "lr_decay_steps")
"""The schedule's settings, which the engine is built with: a change takes effect at the next step."""
STEP_KEYS = ("max_grad_norm",)
"""Settings of each optimizer step the engine is built with (not in its saved state)."""


def changed_settings(cfg: TrainConfig, ckpt: Path) -> list[str]:
    """The schedule's and the step's settings that differ from the checkpoint's config, each said on one line."""
    try:
        saved = read_run_config(ckpt / RUN_CONFIG)
    except ConfigError:  # a config of an older schema: its settings are not known here
        return []
    changed = [key for key in (*SCHEDULE_KEYS, *STEP_KEYS) if getattr(saved, key) != getattr(cfg, key)]
    for key in changed:
        logger.warning("%s changed on resume: %s -> %s", key, getattr(saved, key), getattr(cfg, key))
    return changed


def apply_changed_hyperparameters(cfg: TrainConfig, engine: Any, changes: list[str], step: int,
                                  changed: list[str] | None = None) -> None:
    """The optimizer and scheduler states restored their old settings; the config's current ones win, each change
    logged. With another peak learning rate, another schedule (`changed`: changed_settings) or `changes`
    (describe_changes), the next step's rate is this run's schedule's, said on one line with the rate before and
    after."""
    scheduler, groups = engine.lr_scheduler, engine.optimizer.param_groups
    before = groups[0]["lr"]
    new_peak = scheduler.base_lrs != [cfg.learning_rate] * len(scheduler.base_lrs)
    if new_peak:
        logger.warning("learning_rate changed on resume: %s -> %s", scheduler.base_lrs[0], cfg.learning_rate)
        scheduler.base_lrs = [cfg.learning_rate] * len(scheduler.base_lrs)
    if new_peak or changes or set(changed or ()) & set(SCHEDULE_KEYS):
        # The restored rate is the checkpoint's schedule's; the scheduler was built for this run's length.
        for group, multiplier in zip(groups, scheduler.lr_lambdas):
            group["lr"] = cfg.learning_rate * multiplier(scheduler.last_epoch)
    if changes:
        logger.info("resuming at step %d with %s; learning rate %.3e -> %.3e", step, "; ".join(changes), before,
                    groups[0]["lr"])
    wanted = {"weight_decay": cfg.weight_decay, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    for group in groups:
        for key, value in wanted.items():
            if key in group and tuple(np.atleast_1d(group[key])) != tuple(np.atleast_1d(value)):
                logger.warning("%s changed on resume: %s -> %s", key, group[key], value)
                group[key] = value
