"""The recipe of SFT, the reward model and DPO: config -> data -> model -> engine -> loop -> checkpoints.

`train(cfg, export)` wires plain components in this order, around run.py's start-up, engine and exit (the three
stages differ only where their rows in stages.py say: the data they prepare, their batch spec and model head, DPO's
reference log-probabilities):
  1. process group (deepspeed launcher, torchrun or srun), seeds, run folder with the merged config;
  2. tokenizer with the chat tokens, the stage's datasets formatted into samples or preference groups, read from
     their token stores;
  3. the step plan (which samples each rank reads at each step), the DeepSpeed config, the model (built
     under ZeRO-3's partitioning when configured), the engine with AdamW and our schedule: DeepSpeed's, or
     with `deepspeed=false` the plain PyTorch one of torch_engine.py (one process or DDP), on the same loop;
  4. resume (resume.py): engine state, data position and RNG from a committed checkpoint, on this number of ranks
     or another (reshard.py), with what changed said on one line;
  5. the loop: each optimizer step (step.py) runs its micro-batches (batches.py; with `packing`, each one
     padding-free row), the loss normalized by the supervised tokens of the whole step on all ranks; metrics
     (throughput.py), evaluation (evaluation.py) and atomic checkpoints (saver.py) at their intervals, and a stop
     with a checkpoint when a signal asks for one (preemption.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model_training.checkpoints.read import CheckpointError
from model_training.config import ConfigError, TrainConfig, zero_stage
from model_training.console import ranks
from model_training.data.formatting import format_system_prefix
from model_training.data.preferences import PreparedPreferences, StoredGroups
from model_training.data.prepare import PreparedData
from model_training.data.prompts import sample_prompts
from model_training.data.store import Concatenated, StoredSamples, update_digest
from model_training.data.windows import LengthRule, WholeSamples
from model_training.models.builder import load_tokenizer
from model_training.models.lora import is_lora_model
from model_training.stages import STAGES
from model_training.training.batches import BatchSpec, RunData, SampleSpec, StepReader
from model_training.training.checkpoint import load_checkpoint
from model_training.training.distributed import DistInfo
from model_training.training.evaluation import Evaluator, without_supervised_tokens
from model_training.training.metrics import MetricsLogger
from model_training.training.preemption import StopRequest
from model_training.training.preference_loss import save_references, with_references
from model_training.training.report import eval_lines
from model_training.training.resume import (
    Resume,
    already_complete,
    apply_changed_hyperparameters,
    changed_settings,
    checkpoint_to_resume,
    continued_plan,
    convert_if_needed,
    describe_changes,
    schedule,
)
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
from model_training.training.samples import generate_answers, write_samples
from model_training.training.saver import Saver
from model_training.training.start import Exporter, start_model_config, tokenizer_config
from model_training.training.step import PendingLosses, StepRunner, TrainingError
from model_training.training.step_plan import StepPlan, plan_sources
from model_training.training.throughput import ThroughputMeter

logger = logging.getLogger(__name__)


@dataclass
class TrainerState(FieldsState):
    """Counters that a resume restores, and the data position it continues from."""

    optimizer_step: int = 0
    """Optimizer steps consumed, applied or skipped; step k reads global batch k of the data plan."""
    micro_step: int = 0
    """Micro-batches run on this rank."""
    skipped_steps: int = 0
    """Steps whose update was skipped because a loss was not finite."""
    nonfinite_in_row: int = 0
    """Consecutive skipped steps up to now; training stops at max_nonfinite_steps."""
    tokens_seen: int = 0
    """Real (non-pad) tokens trained on, all ranks."""
    data_fingerprint: str = ""
    """Hash of the training samples and their order (mixture, global batch, seed); a resume that would read
    other data is refused."""
    model_fingerprint: str = ""
    """Model source and shape; a resume with another model is refused."""
    samples_per_step: int = 0
    """The global batch (micro batch x accumulation x ranks) of this run's steps."""
    data_epoch: int = 0
    """With data_offset, where step optimizer_step starts reading: sample data_offset of epoch data_epoch's order
    (written at each save, so that a resume with another global batch goes on from the samples already read)."""
    data_offset: int = 0
    """See data_epoch."""
    epoch_steps: int = 0
    """Optimizer steps per epoch in the global batch the run started with, which `num_train_epochs` counts: a resume
    with another global batch keeps the schedule's length in optimizer steps."""
    total_steps: int = 0
    """The schedule's length in optimizer steps."""

    def count_step(self, micro_batches: int, tokens: int) -> None:
        """One optimizer step consumed: its micro-batches on this rank and its tokens on all ranks."""
        self.optimizer_step += 1
        self.micro_step += micro_batches
        self.tokens_seen += tokens

    def count_nonfinite(self, losses: list[tuple[int, list[float]]], max_in_row: int) -> list[float]:
        """Count the steps among `losses` (step, metrics: the loss first) whose loss was not finite (their updates
        were skipped); stop the run after `max_in_row` of them in a row. Returns the last step's metrics."""
        for step, (loss, *_) in losses:
            if math.isfinite(loss):
                self.nonfinite_in_row = 0
                continue
            self.skipped_steps += 1
            self.nonfinite_in_row += 1
            logger.warning("non-finite loss at optimizer step %d: update skipped on every rank", step)
            if self.nonfinite_in_row >= max_in_row:
                raise TrainingError(
                    f"{self.nonfinite_in_row} optimizer steps in a row with a non-finite loss, the last "
                    f"at step {step}; lower the learning rate or check the data, then resume"
                )
        return losses[-1][1]


def _run_data(cfg: TrainConfig, tokenizer: Any, info: DistInfo, clock: StartupClock) -> RunData:
    """The stage's samples (SFT: conversations cut when batched; rm, dpo: preference groups, cut when formatted) and
    the plan that orders them."""
    data: PreparedData | PreparedPreferences = STAGES[cfg.stage].call("prepare", cfg, tokenizer)
    clock.phase("data", f"{sum(data.cached)} of {len(data.cached)} datasets from the tokenized cache")
    if isinstance(data, PreparedData):
        train_rule, val_rule = _length_rules(cfg, tokenizer)
        empty = without_supervised_tokens(data.val, val_rule, cfg.eval_size)
        if empty is not None:
            key = "val_max_length" if cfg.val_max_length else "max_length"
            raise ConfigError(f"key '{key}' is {val_rule.max_length}: the validation set {empty!r} keeps no token of "
                              f"an assistant's reply once each sample is cut to that length; expected a limit that "
                              "reaches into the replies")
    else:
        train_rule = val_rule = WholeSamples()
    # One pool of every dataset's samples, read where they lie (a token store, data/store.py): nothing is copied.
    samples = Concatenated([split.samples for split in data.train])
    plan = StepPlan(
        sources=plan_sources([s.name for s in data.train], [len(s.samples) for s in data.train], data.options),
        world_size=info.world_size,
        rank=info.rank,
        micro_batch_size=cfg.per_device_train_batch_size,
        accumulation_steps=cfg.gradient_accumulation_steps,
        seed=cfg.rng_seed,
        lengths=_sort_lengths(data.train, cfg.max_length) if cfg.sort_by_length else None,
    )
    return RunData(samples, plan, train_rule, data.val, val_rule)


def _sort_lengths(splits: list[Any], max_length: int) -> tuple[int, ...]:
    """The lengths `sort_by_length` orders the pool by: a sample's as it trains, a group's longest sequence (cut when
    formatted), which its padded rows take."""
    lengths: list[int] = []
    for split in splits:
        if isinstance(split.samples, StoredSamples):
            lengths += np.minimum(split.samples.lengths, max_length).tolist()
        elif isinstance(split.samples, StoredGroups):
            lengths += split.samples.lengths.tolist()
        else:
            lengths += [max(len(s.input_ids) for s in group.sequences) for group in split.samples]
    return tuple(lengths)


def _length_rules(cfg: TrainConfig, tokenizer: Any) -> tuple[LengthRule, LengthRule]:
    """How SFT samples are cut to the length limits, in training and in validation."""
    prefix = format_system_prefix(cfg.system_prefix, tokenizer, cfg.chat_format) if cfg.use_system_prefix else None
    try:
        return (LengthRule(cfg.max_length, cfg.random_offset_probability, cfg.rng_seed, prefix),
                LengthRule(cfg.val_max_length or cfg.max_length, cfg.random_offset_probability, cfg.rng_seed, prefix))
    except ValueError as err:
        raise ConfigError(f"key 'system_prefix': {err}") from None


def _fingerprint_data(data: RunData) -> str:
    """The training samples, the plan that orders them and the rule that cuts them: a resume must read the same
    data in the same order."""
    plan = data.plan
    digest = hashlib.sha256(repr((plan.sources, plan.samples_per_step, plan.seed, plan.lengths is not None,
                                  data.train_rule.fingerprint())).encode())
    update_digest(data.samples, digest)
    return digest.hexdigest()[:16]


def _fingerprint_model(cfg: TrainConfig) -> str:
    """Model source and shape, the stage and its objective's options, and what is trained (LoRA adapters on which
    base)."""
    source = cfg.model_name if cfg.model_config is None else repr(sorted(cfg.model_config.items()))
    stage = STAGES[cfg.stage]
    if stage.named_in_fingerprint:
        source += f"|stage={stage.name}"
    for section in stage.fingerprint:
        source += repr(asdict(getattr(cfg, section)))
    if cfg.peft.type is not None:  # full fine-tuning keeps the fingerprint its earlier checkpoints carry
        source += repr((asdict(cfg.peft), asdict(cfg.quantization)))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def train(cfg: TrainConfig, export: Exporter) -> Path:
    """Run the training described by `cfg`; return the run folder. A signal stops it at the next optimizer step with
    a checkpoint and raises `Stopped` (preemption.py). `export`: how a model given as a training checkpoint becomes a
    folder to load (training/start.py)."""
    return launch(cfg, partial(_train, export=export))


def _train(cfg: TrainConfig, stop: StopRequest, export: Exporter) -> Path:
    info, clock = start_run(cfg, cfg.deepspeed)
    output_dir = Path(cfg.output_dir)

    # A training checkpoint as model_name: its tokenizer is read where it lies, and the checkpoint is exported only
    # once the data and the resume are checked; the run's own config (fingerprint, saves) keeps model_name.
    tokenizer = load_tokenizer(tokenizer_config(cfg))
    clock.phase("tokenizer")
    data = _run_data(cfg, tokenizer, info, clock)
    state = TrainerState(data_fingerprint=_fingerprint_data(data), model_fingerprint=_fingerprint_model(cfg),
                         samples_per_step=data.plan.samples_per_step)
    # A resume that does not fit is refused before anything is built or written.
    resume = _checkpoint_to_continue(cfg, data, state)
    if resume is not None and already_complete(cfg, resume, resume.saved["optimizer_step"], state.total_steps):
        leave_process_group()
        return output_dir
    model_cfg = start_model_config(cfg, info, export)
    if resume is not None:
        data = replace(data, plan=continued_plan(data.plan, resume))
        convert_if_needed(cfg, resume)
    clear_earlier_run(cfg, info)

    engine = build_engine(model_cfg, tokenizer, info, state.total_steps, clock, resume is not None and resume.universal)
    clock.phase("engine init", f"optimizer {type(engine.basic_optimizer).__name__}")
    record_config(cfg, info)

    # How the stage's samples become batches and losses.
    spec: SampleSpec = STAGES[cfg.stage].call("spec", cfg, tokenizer, engine)
    if resume is not None:
        _resume(cfg, engine, state, resume, data.plan)
        clock.phase("resume")
    if STAGES[cfg.stage].references:
        resume_from = None if resume is None else resume.checkpoint
        data = with_references(engine, spec, data, cfg.per_device_eval_batch_size, cfg.eval_size, info, resume_from)
        clock.phase("reference log-probabilities", "from the checkpoint" if resume_from else "computed")
    _log_plan(cfg, data, state.total_steps, engine, spec, info.world_size)
    parts = _loop_parts(cfg, engine, tokenizer, data, info, state, spec, stop)
    tokens_before = state.tokens_seen

    def loop(metrics: MetricsLogger) -> LoopResult:
        _loop(cfg, engine, state, parts, metrics, clock)
        return LoopResult(state.optimizer_step, state.tokens_seen - tokens_before)

    logged_loop(cfg, info, loop, partial(_generate_samples, cfg, engine, parts, state))
    return output_dir


def _checkpoint_to_continue(cfg: TrainConfig, data: RunData, state: TrainerState) -> Resume | None:
    """The checkpoint to resume from, if asked (resume.py checks it), and the schedule's length into `state`."""
    resume = None
    if cfg.resume_from_checkpoint:
        # The fingerprint of the same data read in global batches of another size: the plan counts in the hash only
        # through its samples_per_step, which these fields give.
        resume = checkpoint_to_resume(cfg, state, Path(cfg.output_dir), lambda batch: _fingerprint_data(
            replace(data, plan=replace(data.plan, world_size=batch, micro_batch_size=1, accumulation_steps=1))))
    run_schedule = schedule(cfg, data.plan, resume)
    state.epoch_steps, state.total_steps = run_schedule.epoch_steps, run_schedule.total_steps
    return resume


def _log_plan(cfg: TrainConfig, data: RunData, total_steps: int, engine: Any, spec: SampleSpec, world: int) -> None:
    plan = data.plan
    logger.info(
        "%s: %d training samples, %d drawn per epoch, %d steps per epoch, %d steps in all; %s on %s; "
        "%s micro-batches%s",
        cfg.stage, len(data.samples), plan.samples_per_epoch, plan.steps_per_epoch, total_steps,
        f"ZeRO stage {zero_stage(engine.config)}" if cfg.deepspeed else "plain PyTorch", ranks(world),
        "packed" if cfg.packing else "padded",
        f", loss from {'hidden states in chunks' if spec.chunked else 'logits'}" if isinstance(spec, BatchSpec) else "",
    )


def _resume(cfg: TrainConfig, engine: Any, state: TrainerState, resume: Resume, plan: StepPlan) -> None:
    """Load the engine, counters and RNG states of a checkpoint `checkpoint_to_resume` accepted, and say what
    differs from its run (resume.py)."""
    try:
        saved = load_checkpoint(engine, resume.checkpoint, trained_only=is_lora_model(engine.module),
                                rng_seed=cfg.rng_seed)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume from {resume.checkpoint}: {err}") from None
    # This run's batch, schedule and data fingerprint (its batch's: the checkpoints it saves pair them); the rest is
    # the checkpoint's.
    mine = ("samples_per_step", "epoch_steps", "total_steps", "data_fingerprint")
    state.load_state_dict({**saved, **{key: getattr(state, key) for key in mine}})
    changes = describe_changes(cfg, resume, plan, state.total_steps)
    apply_changed_hyperparameters(cfg, engine, changes, state.optimizer_step, changed_settings(cfg, resume.checkpoint))
    logger.info("resumed from %s at optimizer step %d", resume.checkpoint, state.optimizer_step)


@dataclass(frozen=True)
class LoopParts:
    """The named pieces the loop calls, made once for the run."""

    total_steps: int
    steps_per_epoch: int
    data: RunData
    reader: StepReader
    run_step: StepRunner
    evaluate: Evaluator
    saver: Saver
    stop: StopRequest
    tokenizer: Any
    info: DistInfo

    @property
    def show_progress(self) -> bool:
        return self.info.is_main


def _loop_parts(
    cfg: TrainConfig, engine: Any, tokenizer: Any, data: RunData, info: DistInfo, state: TrainerState,
    spec: SampleSpec, stop: StopRequest,
) -> LoopParts:

    def keep_references(folder: Path) -> None:
        # A resume cannot compute them again from weights that have moved on.
        save_references(folder, data.samples, [split.samples for split in data.val])

    return LoopParts(
        total_steps=state.total_steps,
        steps_per_epoch=state.epoch_steps,
        data=data,
        reader=StepReader(data),
        run_step=StepRunner(engine, spec, info.world_size, cfg.dtype),
        evaluate=Evaluator(data.val, data.val_rule, cfg.eval_size, cfg.per_device_eval_batch_size, spec, info.rank,
                           info.world_size),
        saver=Saver(cfg, tokenizer, state.total_steps, state.epoch_steps,
                    keep_references if STAGES[cfg.stage].references else None),
        stop=stop,
        tokenizer=tokenizer,
        info=info,
    )


def _loop(
    cfg: TrainConfig, engine: Any, state: TrainerState, parts: LoopParts, metrics: MetricsLogger, clock: StartupClock
) -> None:
    """Optimizer steps up to `parts.total_steps`; at their intervals the losses are read, logged, evaluated and
    saved. After each step the ranks agree whether a signal asked for a stop (one all-reduce of one number): the
    step's losses are then logged and saved, without waiting for an evaluation, and `Stopped` is raised."""
    total_steps = parts.total_steps
    engine.train()
    meter, pending = ThroughputMeter(), PendingLosses()
    progress = tqdm(total=total_steps, initial=state.optimizer_step, disable=not parts.show_progress,
                    dynamic_ncols=True)
    first_step = state.optimizer_step + 1
    if parts.stop.agreed():  # asked while starting: nothing trained since the checkpoint the run started from
        parts.stop.stopped(state.optimizer_step, None)
    while state.optimizer_step < total_steps:
        samples = parts.reader.read(state.optimizer_step)
        sums, data_time = parts.run_step(samples, state.optimizer_step)
        pending.add(state.optimizer_step + 1, sums, samples.loss_units)
        state.count_step(len(samples.micro_batches), samples.tokens)
        meter.add(samples.tokens, data_time)
        progress.update(1)
        if state.optimizer_step == first_step:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()  # once: the phase ends when the device has finished the step
            clock.phase("first optimizer step")

        step, stopping = state.optimizer_step, parts.stop.agreed()
        log_now = stopping or _every(step, cfg.logging_steps, total_steps)
        eval_now = not stopping and _every(step, cfg.eval_steps, total_steps)
        save_now = parts.saver.due(step) or (stopping and parts.saver.enabled)
        if log_now or eval_now or save_now:
            # The losses are read only here (a host sync): the steps in between run back to back on the device.
            losses = pending.read()
            record = _read_losses(cfg.max_nonfinite_steps, engine, state, parts, losses, meter, progress, log_now)
            if eval_now:
                results = parts.evaluate(engine)
                record.update(results)
                if parts.show_progress:
                    for line in eval_lines(step, results):
                        progress.write(line)
            if record:
                metrics.log({"step": step, **record})
        saved = parts.saver.save(engine, step, _saved_state(state, parts)) if save_now else None
        if stopping:
            parts.stop.stopped(step, saved)
    progress.close()


def _read_losses(
    max_nonfinite_steps: int, engine: Any, state: TrainerState, parts: LoopParts, losses: list[tuple[int, list[float]]],
    meter: ThroughputMeter, progress: tqdm, log_now: bool,
) -> dict[str, Any]:
    """Count the non-finite steps among the pending `losses`; with `log_now`, the metrics line of the last one."""
    # The last step's metrics: the loss, then the spec's others (accuracy; DPO's rewards and margin).
    loss, *others = state.count_nonfinite(losses, max_nonfinite_steps)
    record: dict[str, Any] = {}
    if log_now:
        record.update(_log_record(engine, state, loss, meter.read_and_reset(), parts.steps_per_epoch))
        record.update(zip(parts.run_step.spec.metrics[1:], others, strict=True))
        progress.set_postfix(epoch=f"{record['epoch']:.2f}", loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}")
    return record


def _saved_state(state: TrainerState, parts: LoopParts) -> dict[str, Any]:
    """The trainer state a checkpoint holds: the counters, and where the next step reads."""
    position = parts.data.plan.position(state.optimizer_step)
    return {**state.state_dict(), "data_epoch": position.epoch, "data_offset": position.offset}


def _every(step: int, interval: int | None, total_steps: int) -> bool:
    """Whether `step` ends an interval of `interval` steps (None: no interval) or the run."""
    return step == total_steps or (bool(interval) and step % interval == 0)


def _log_record(
    engine: Any, state: TrainerState, loss: float, throughput: dict[str, float], steps_per_epoch: int
) -> dict[str, Any]:
    """A metrics line's training values after the optimizer step `state` has just counted."""
    norm = engine.get_global_grad_norm()
    return {
        "loss": loss,
        "lr": engine.get_lr()[0],
        "grad_norm": None if norm is None else float(norm),
        "tokens": state.tokens_seen,
        **throughput,
        "epoch": round(state.optimizer_step / steps_per_epoch, 4),
        "skipped_steps": state.skipped_steps,
    }


def _generate_samples(
    cfg: TrainConfig, engine: Any, parts: LoopParts, state: TrainerState, metrics: MetricsLogger
) -> None:
    """The prompt -> answer table of the trained model (training/samples.py), when the config asks for one."""
    if not (cfg.generate_samples or cfg.generate_val_samples):
        return
    # Only SFT may ask for validation openings (config/checks.py): the preference stages' validation sets are groups
    # of replies, with no openings to answer.
    val_splits = parts.data.val if cfg.generate_val_samples else []
    tokenizer, info = parts.tokenizer, parts.info
    prompts = sample_prompts(cfg.generate_samples, val_splits, cfg.generate_val_samples, tokenizer, cfg.chat_format)
    rows = generate_answers(
        engine.module, tokenizer, prompts, cfg.generate_max_new_tokens,
        partitioned=zero_stage(engine.config) == 3, rank=info.rank, world_size=info.world_size,
    )
    if rows is not None:
        write_samples(rows, Path(cfg.output_dir))
        columns = ["source", "prompt", "answer"]
        metrics.log_table("samples", columns, [[row[c] for c in columns] for row in rows], state.optimizer_step)
