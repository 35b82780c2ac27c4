"""The SFT recipe: config -> data -> model -> engine -> loop -> checkpoints.

`train(cfg)` wires plain components in this order:
  1. process group (deepspeed launcher, torchrun or srun), seeds, run folder with the merged config;
  2. tokenizer with the chat tokens, datasets formatted into samples (every rank holds all of them);
  3. the step plan (which samples each rank reads at each step), the DeepSpeed config, the model (built
     under ZeRO-3's partitioning when configured), the engine with AdamW and our schedule: DeepSpeed's, or
     with `deepspeed=false` the plain PyTorch one of torch_engine.py (one process or DDP), on the same loop;
  4. resume: engine state, data position and RNG from a committed checkpoint;
  5. the loop: each optimizer step (step.py) runs its micro-batches (batches.py; with `packing`, each one
     padding-free row), the loss normalized by the supervised tokens of the whole step on all ranks; metrics
     (throughput.py), evaluation (evaluation.py) and atomic checkpoints (saver.py) at their intervals.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import psutil
import torch
import torch.distributed as dist
from tqdm import tqdm

from model_training.config import ConfigError, TrainConfig, to_yaml, zero_stage
from model_training.data.formatting import FormattedSample, format_system_prefix
from model_training.data.preferences import PreferenceGroup, PreparedPreferences, prepare_preferences
from model_training.data.registry import PreparedData, TokenizedSplit, prepare_data
from model_training.data.windows import LengthRule, WholeSamples
from model_training.layout import BASE_MODEL_DIR, RUN_CONFIG, remove_run
from model_training.models.builder import build_model, load_tokenizer
from model_training.models.lora import is_lora_model
from model_training.training.answers import generate_answers, sample_prompts, write_samples
from model_training.training.batches import BatchSpec, RunData, SampleSpec, StepReader, uses_chunked_loss
from model_training.training.checkpoint import (
    CheckpointError,
    checkpoint_bytes,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    verify_hashes_on_ranks,
)
from model_training.training.distributed import DistInfo, init_distributed
from model_training.training.ds_config import build_deepspeed_config, clean_cuda_arch_list
from model_training.training.evaluation import Evaluator
from model_training.training.metrics import MetricsLogger
from model_training.training.preference import PreferenceSpec, save_references, with_references
from model_training.training.sampler import StepPlan, plan_sources
from model_training.training.saver import Saver
from model_training.training.schedule import build_scheduler
from model_training.training.start import start_model_config
from model_training.training.step import PendingLosses, StepRunner, TrainingError
from model_training.training.throughput import ThroughputMeter
from model_training.training.torch_engine import build_torch_engine, holds_torch_engine_state

logger = logging.getLogger(__name__)


class FieldsState:
    """`state_dict` / `load_state_dict` of a dataclass whose every field is what a resume restores (the counters
    saved in trainer_state.json: SFT's and the preference stages' `TrainerState`, PPO's `RlState`)."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, state[f.name])


@dataclass
class TrainerState(FieldsState):
    """Counters that a resume restores; the data position follows from `optimizer_step`."""

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_data(cfg: TrainConfig, tokenizer: Any, info: DistInfo, clock: StartupClock) -> RunData:
    """The stage's samples (SFT: conversations cut when batched; rm, dpo: preference groups, cut when formatted) and
    the plan that orders them."""
    if cfg.stage == "sft":
        data: PreparedData | PreparedPreferences = prepare_data(cfg, tokenizer)
        clock.phase("data", f"{sum(data.cached)} of {len(data.cached)} datasets from the tokenized cache")
        train_rule, val_rule = _length_rules(cfg, tokenizer)
    else:
        data = prepare_preferences(cfg, tokenizer)
        clock.phase("data", "preference groups")
        train_rule = val_rule = WholeSamples()
    samples = [s for split in data.train for s in split.samples]
    plan = StepPlan(
        sources=plan_sources([s.name for s in data.train], [len(s.samples) for s in data.train], data.options),
        world_size=info.world_size,
        rank=info.rank,
        micro_batch_size=cfg.per_device_train_batch_size,
        accumulation_steps=cfg.gradient_accumulation_steps,
        seed=cfg.rng_seed,
        lengths=tuple(_sort_length(s, cfg.max_length) for s in samples) if cfg.sort_by_length else None,
    )
    return RunData(samples, plan, train_rule, data.val, val_rule)


def _sort_length(sample: FormattedSample | PreferenceGroup, max_length: int) -> int:
    """The length `sort_by_length` orders by: a sample's as it trains, a group's longest sequence (cut when formatted),
    which its padded rows take."""
    if isinstance(sample, PreferenceGroup):
        return max(len(s.input_ids) for s in sample.sequences)
    return min(sample.num_tokens, max_length)


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
    for sample in data.samples:
        if isinstance(sample, PreferenceGroup):
            # Each group closed by a separator: the same sequences grouped otherwise are other data.
            for sequence in sample.sequences:
                sequence.update_digest(digest)
            digest.update(b"|")
        else:
            sample.update_digest(digest)
    return digest.hexdigest()[:16]


def _fingerprint_model(cfg: TrainConfig) -> str:
    """Model source and shape, and what is trained (LoRA adapters on which base)."""
    source = cfg.model_name if cfg.model_config is None else repr(sorted(cfg.model_config.items()))
    if cfg.stage != "sft":  # SFT keeps the fingerprint its earlier checkpoints carry
        source += f"|stage={cfg.stage}"
    if cfg.stage == "dpo":  # another objective is another run
        source += repr(asdict(cfg.dpo))
    if cfg.peft.type is not None:  # full fine-tuning keeps the fingerprint its earlier checkpoints carry
        source += repr((asdict(cfg.peft), asdict(cfg.quantization)))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def setup_logging(info: DistInfo) -> None:
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format=f"[%(asctime)s rank{info.rank}] %(levelname)s %(name)s: %(message)s",
    )


def train(cfg: TrainConfig) -> Path:
    """Run the training described by `cfg`; return the run folder."""
    clock = StartupClock()
    info = init_distributed(cfg.local_rank, cfg.deepspeed)
    setup_logging(info)
    clock.phase("process start, imports and distributed init")
    seed_everything(cfg.rng_seed)
    output_dir = Path(cfg.output_dir)

    # A training checkpoint as model_name is exported first; the run's own config (fingerprint, saves) keeps it.
    model_cfg = start_model_config(cfg, info)
    tokenizer = load_tokenizer(model_cfg)
    clock.phase("tokenizer")
    data = _run_data(cfg, tokenizer, info, clock)
    plan = data.plan
    # A fraction of an epoch trains that share of the first epoch's steps (OpenAssistant's num_train_epochs: 0.2).
    total_steps = cfg.max_steps or math.ceil(plan.steps_per_epoch * cfg.num_train_epochs)
    state = TrainerState(data_fingerprint=_fingerprint_data(data), model_fingerprint=_fingerprint_model(cfg))
    # A resume that does not fit is refused before anything is built or written.
    resume_from = checkpoint_to_resume(cfg, state, output_dir) if cfg.resume_from_checkpoint else None
    if info.is_main and cfg.overwrite_output_dir:
        remove_earlier_run(output_dir)

    engine = build_engine(model_cfg, tokenizer, info, total_steps, clock)
    clock.phase("engine init", f"optimizer {type(engine.basic_optimizer).__name__}")
    if info.is_main:
        # Written once the run has started: a launch that fails earlier leaves no run folder behind.
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_CONFIG).write_text(to_yaml(cfg))

    spec = _sample_spec(cfg, tokenizer, engine)
    if resume_from is not None:
        _resume(cfg, engine, state, resume_from)
        clock.phase("resume")
    if cfg.stage == "dpo":
        data = with_references(engine, spec, data, cfg.per_device_eval_batch_size, cfg.eval_size, info, resume_from)
        clock.phase("reference log-probabilities", "from the checkpoint" if resume_from else "computed")
    _log_plan(cfg, data, total_steps, engine, spec, info.world_size)

    metrics = MetricsLogger(cfg, output_dir, enabled=info.is_main)
    try:
        _loop(cfg, engine, state, _loop_parts(cfg, engine, tokenizer, data, info, total_steps, spec), metrics, clock)
        metrics.plot_curves(state.optimizer_step)  # rank 0, after the last record; a failure only warns
        if cfg.generate_samples or cfg.generate_val_samples:
            # The preference stages' validation sets are groups of replies, with no openings to answer.
            val_splits = data.val if cfg.stage == "sft" else []
            _generate_samples(cfg, engine, tokenizer, val_splits, state, metrics, info)
    finally:
        metrics.close()
    # Tear the process group down here, not at interpreter exit: ZeRO-3 on CPU ranks can otherwise abort
    # after finishing ("terminate called without an active exception") and turn a good run's exit status bad.
    dist.barrier()
    dist.destroy_process_group()
    return output_dir


def _log_plan(cfg: TrainConfig, data: RunData, total_steps: int, engine: Any, spec: SampleSpec, world: int) -> None:
    plan = data.plan
    logger.info(
        "%s: %d training samples, %d drawn per epoch, %d steps per epoch, %d steps in all; %s on %d ranks; "
        "%s micro-batches%s",
        cfg.stage, len(data.samples), plan.samples_per_epoch, plan.steps_per_epoch, total_steps,
        f"ZeRO stage {zero_stage(engine.config)}" if cfg.deepspeed else "plain PyTorch", world,
        "packed" if cfg.packing else "padded",
        f", loss from {'hidden states in chunks' if spec.chunked else 'logits'}" if cfg.stage == "sft" else "",
    )


def _sample_spec(cfg: TrainConfig, tokenizer: Any, engine: Any) -> SampleSpec:
    """How the stage's samples become batches and losses."""
    if cfg.stage == "sft":
        return BatchSpec(cfg.packing, tokenizer.pad_token_id, uses_chunked_loss(cfg, engine))
    return PreferenceSpec(cfg.stage, cfg.packing, tokenizer.pad_token_id, cfg.dpo)


def build_engine(cfg: TrainConfig, tokenizer: Any, info: DistInfo, total_steps: int, clock: StartupClock) -> Any:
    """The model inside its engine: DeepSpeed's, or without DeepSpeed the plain PyTorch one (torch_engine.py),
    each with PyTorch's AdamW and our schedule."""
    # A LoRA checkpoint holds only the adapters: a random-weight base must be kept for the export.
    keep_base = cfg.peft.type is not None and cfg.model_config is not None and cfg.save_strategy != "no"
    save_base_to = Path(cfg.output_dir) / BASE_MODEL_DIR if keep_base and info.is_main else None
    if not cfg.deepspeed:
        model = build_model(cfg, tokenizer, {}, save_base_to)
        clock.phase("model build")
        return build_torch_engine(model, cfg, info.world_size, total_steps)
    ds_config = build_deepspeed_config(cfg, info.world_size, cuda=torch.cuda.is_available(), total_steps=total_steps)
    model = build_model(cfg, tokenizer, ds_config, save_base_to)
    clock.phase("model build")
    clean_cuda_arch_list()  # before DeepSpeed builds an op (the offloaded optimizer's CPU Adam)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.warmup_steps, total_steps, cfg.lr_scheduler_type,
                                                 cfg.lr_decay_steps),
    )
    return engine


class StartupClock:
    """Seconds of each startup phase, logged (by rank 0) as each one ends, so a slow start shows where."""

    def __init__(self) -> None:
        # The first phase counts from the process's start (the interpreter, the imports), which only the OS knows.
        self.last = time.perf_counter() - (time.time() - psutil.Process().create_time())

    def phase(self, name: str, detail: str = "") -> None:
        now = time.perf_counter()
        logger.info("startup: %s %.1f s%s", name, now - self.last, f" ({detail})" if detail else "")
        self.last = now


def remove_earlier_run(output_dir: Path) -> None:
    """`overwrite_output_dir`: the earlier run in output_dir goes before anything of this one is written."""
    removed = remove_run(output_dir)
    if removed:
        logger.warning("overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed), output_dir)


def checkpoint_to_resume(cfg: TrainConfig, state: Any, output_dir: Path) -> Path:
    """The committed checkpoint to continue from, checked before anything is built: it must exist and verify
    (every file against its manifest's hash, the ranks sharing the work, unless `verify_checkpoint_hashes` is
    off), have been saved by the same engine (DeepSpeed or not) and as many ranks, and train the same model on the
    same data in the same order: `state`'s data_fingerprint and model_fingerprint (TrainerState's, or PPO's)."""
    try:
        ckpt = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume ('resume_from_checkpoint'): {err}") from None
    if holds_torch_engine_state(ckpt) == cfg.deepspeed:
        saved_by, setting = ("without", "deepspeed=false") if cfg.deepspeed else ("on", "deepspeed=true")
        raise ConfigError(f"cannot resume from {ckpt}: it was saved by a run {saved_by} DeepSpeed, whose engine "
                          f"state this run cannot load; resume it with {setting}")
    try:
        saved = read_trainer_state(ckpt)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume from {ckpt}: {err}") from None
    for key, what in (("data_fingerprint", "training data or its order"), ("model_fingerprint", "model")):
        if saved[key] != getattr(state, key):
            raise ConfigError(
                f"cannot resume from {ckpt}: the {what} differs from the checkpoint's "
                f"({saved[key]} there, {getattr(state, key)} now); start a new run in another output_dir"
            )
    if cfg.verify_checkpoint_hashes:
        try:
            seconds = verify_hashes_on_ranks(ckpt)
        except CheckpointError as err:
            raise ConfigError(f"cannot resume from {ckpt}: {err}") from None
        gigabytes = checkpoint_bytes(ckpt) / 1e9
        logger.info(
            "every file of %s matches its manifest's hash: %.2f GB in %.1f s on %d ranks (%.2f s/GB of checkpoint)",
            ckpt, gigabytes, seconds, dist.get_world_size(), seconds / max(gigabytes, 1e-9),
        )
    return ckpt


def _resume(cfg: TrainConfig, engine: Any, state: TrainerState, ckpt: Path) -> None:
    """Load the engine, data position and RNG states of a checkpoint `checkpoint_to_resume` accepted."""
    try:
        saved = load_checkpoint(engine, ckpt, trained_only=is_lora_model(engine.module))
    except CheckpointError as err:
        raise ConfigError(f"cannot resume from {ckpt}: {err}") from None
    state.load_state_dict(saved)
    _apply_changed_hyperparameters(cfg, engine)
    logger.info("resumed from %s at optimizer step %d", ckpt, state.optimizer_step)


def _apply_changed_hyperparameters(cfg: TrainConfig, engine: Any) -> None:
    """The optimizer and scheduler states restored their old settings; the config's current ones win, logged."""
    scheduler = engine.lr_scheduler
    if scheduler.base_lrs != [cfg.learning_rate] * len(scheduler.base_lrs):
        logger.warning("learning_rate changed on resume: %s -> %s", scheduler.base_lrs[0], cfg.learning_rate)
        scheduler.base_lrs = [cfg.learning_rate] * len(scheduler.base_lrs)
        for group, multiplier in zip(engine.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = cfg.learning_rate * multiplier(scheduler.last_epoch)
    wanted = {"weight_decay": cfg.weight_decay, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    for group in engine.optimizer.param_groups:
        for key, value in wanted.items():
            if key in group and tuple(np.atleast_1d(group[key])) != tuple(np.atleast_1d(value)):
                logger.warning("%s changed on resume: %s -> %s", key, group[key], value)
                group[key] = value


@dataclass(frozen=True)
class LoopParts:
    """The named pieces the loop calls, made once for the run."""

    total_steps: int
    steps_per_epoch: int
    reader: StepReader
    run_step: StepRunner
    evaluate: Evaluator
    saver: Saver
    show_progress: bool


def _loop_parts(
    cfg: TrainConfig, engine: Any, tokenizer: Any, data: RunData, info: DistInfo, total_steps: int, spec: SampleSpec
) -> LoopParts:

    def keep_references(folder: Path) -> None:
        # A resume cannot compute them again from weights that have moved on.
        save_references(folder, data.samples, [split.samples for split in data.val])

    return LoopParts(
        total_steps=total_steps,
        steps_per_epoch=data.plan.steps_per_epoch,
        reader=StepReader(data),
        run_step=StepRunner(engine, spec, info.world_size, cfg.dtype),
        evaluate=Evaluator(data.val, data.val_rule, cfg.eval_size, cfg.per_device_eval_batch_size, spec, info.rank,
                           info.world_size),
        saver=Saver(cfg, tokenizer, total_steps, data.plan.steps_per_epoch,
                    keep_references if cfg.stage == "dpo" else None),
        show_progress=info.is_main,
    )


def _loop(
    cfg: TrainConfig, engine: Any, state: TrainerState, parts: LoopParts, metrics: MetricsLogger, clock: StartupClock
) -> None:
    """Optimizer steps up to `parts.total_steps`; at their intervals the losses are read, logged, evaluated and
    saved."""
    total_steps = parts.total_steps
    engine.train()
    meter, pending = ThroughputMeter(), PendingLosses()
    progress = tqdm(total=total_steps, initial=state.optimizer_step, disable=not parts.show_progress,
                    dynamic_ncols=True)
    first_step = state.optimizer_step + 1
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

        step = state.optimizer_step
        log_now = _every(step, cfg.logging_steps, total_steps)
        eval_now = _every(step, cfg.eval_steps, total_steps)
        save_now = parts.saver.due(step)
        if not (log_now or eval_now or save_now):
            continue
        # The losses are read only here (a host sync): the steps in between run back to back on the device.
        # The last step's metrics: the loss, then the spec's others (accuracy; DPO's rewards and margin).
        loss, *others = state.count_nonfinite(pending.read(), cfg.max_nonfinite_steps)
        record: dict[str, Any] = {}
        if log_now:
            record.update(_log_record(engine, state, loss, meter.read_and_reset(), parts.steps_per_epoch))
            record.update(zip(parts.run_step.spec.metrics[1:], others, strict=True))
            progress.set_postfix(epoch=f"{record['epoch']:.2f}", loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
        if eval_now:
            record.update(parts.evaluate(engine))
        if record:
            metrics.log({"step": step, **record})
        if save_now:
            parts.saver.save(engine, step, state.state_dict())
    progress.close()


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
    cfg: TrainConfig,
    engine: Any,
    tokenizer: Any,
    val_splits: list[TokenizedSplit],
    state: TrainerState,
    metrics: MetricsLogger,
    info: DistInfo,
) -> None:
    """The prompt -> answer table of the trained model (see samples.py)."""
    prompts = sample_prompts(cfg.generate_samples, val_splits, cfg.generate_val_samples, tokenizer, cfg.chat_format)
    rows = generate_answers(
        engine.module, tokenizer, prompts, cfg.generate_max_new_tokens,
        partitioned=zero_stage(engine.config) == 3, rank=info.rank, world_size=info.world_size,
    )
    if rows is not None:
        write_samples(rows, Path(cfg.output_dir))
        columns = ["source", "prompt", "answer"]
        metrics.log_table("samples", columns, [[row[c] for c in columns] for row in rows], state.optimizer_step)


def run_or_exit(cfg: TrainConfig, run: Callable[[TrainConfig], Path] = train) -> int:
    """`run(cfg)` (`train`, or PPO's `train_rl`), with the failures a user can act on reported as one clear line and
    exit status 1."""
    try:
        run(cfg)
    except (TrainingError, CheckpointError) as err:
        logger.error("%s", err)
        return 1
    return 0
