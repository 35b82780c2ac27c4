"""The SFT recipe: config -> data -> model -> engine -> loop -> checkpoints.

`train(cfg)` wires plain components in this order:
  1. process group (deepspeed launcher, torchrun or srun), seeds, run folder with the merged config;
  2. tokenizer with the chat tokens, datasets formatted into samples (every rank holds all of them);
  3. the step plan (which samples each rank reads at each step), the DeepSpeed config, the model (built
     under ZeRO-3's partitioning when configured), the engine with AdamW and our schedule: DeepSpeed's, or
     with `deepspeed=false` the plain PyTorch one of torch_engine.py (one process or DDP), on the same loop;
  4. resume: engine state, data position and RNG from a committed checkpoint;
  5. the loop: each optimizer step runs its micro-batches (with `packing`, each one padding-free row), the
     loss normalized by the supervised tokens of the whole step on all ranks; metrics, evaluation and atomic
     checkpoints at their intervals.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
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
from model_training.data.collate import collate, to_device
from model_training.data.formatting import FormattedSample, format_system_prefix
from model_training.data.registry import PreparedData, TokenizedSplit, prepare_data
from model_training.data.windows import EVALUATION, LengthRule
from model_training.layout import (
    ADAPTER_DIR,
    BASE_MODEL_DIR,
    MODEL_CONFIG_DIR,
    RUN_CONFIG,
    TOKENIZER_DIR,
    remove_run,
)
from model_training.models.builder import base_model_reference, build_model, load_tokenizer
from model_training.models.lora import ADAPTER_NAME, is_lora_model
from model_training.training.answers import generate_answers, sample_prompts, write_samples
from model_training.training.checkpoint import (
    CheckpointError,
    checkpoint_bytes,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    verify_hashes_on_ranks,
)
from model_training.training.distributed import DistInfo, init_distributed
from model_training.training.ds_config import build_deepspeed_config, clean_cuda_arch_list
from model_training.training.loss import chunked_supervised_token_sums, count_supervised, supervised_token_sums
from model_training.training.metrics import MetricsLogger
from model_training.training.sampler import StepPlan, plan_sources
from model_training.training.schedule import build_scheduler
from model_training.training.torch_engine import TorchEngine, build_torch_engine, holds_torch_engine_state

logger = logging.getLogger(__name__)

PAD_TO_MULTIPLE_OF = 8


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses, a resume that does not fit); the message says why."""


@dataclass
class TrainerState:
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

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, state[f.name])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class RunData:
    """What the loop reads: the training samples in one pool, the plan that orders them, how a sample is cut
    to the length limit, and the validation sets with their own rule."""

    samples: list[FormattedSample]
    plan: StepPlan
    train_rule: LengthRule
    val: list[TokenizedSplit]
    val_rule: LengthRule


def _run_data(cfg: TrainConfig, tokenizer: Any, data: PreparedData, info: DistInfo) -> RunData:
    samples = [s for split in data.train for s in split.samples]
    prefix = format_system_prefix(cfg.system_prefix, tokenizer, cfg.chat_format) if cfg.use_system_prefix else None
    try:
        train_rule = LengthRule(cfg.max_length, cfg.random_offset_probability, cfg.rng_seed, prefix)
        val_rule = LengthRule(cfg.val_max_length or cfg.max_length, cfg.random_offset_probability, cfg.rng_seed,
                              prefix)
    except ValueError as err:
        raise ConfigError(f"key 'system_prefix': {err}") from None
    plan = StepPlan(
        sources=plan_sources([s.name for s in data.train], [len(s.samples) for s in data.train], data.options),
        world_size=info.world_size,
        rank=info.rank,
        micro_batch_size=cfg.per_device_train_batch_size,
        accumulation_steps=cfg.gradient_accumulation_steps,
        seed=cfg.rng_seed,
        lengths=tuple(min(len(s.input_ids), cfg.max_length) for s in samples) if cfg.sort_by_length else None,
    )
    return RunData(samples, plan, train_rule, data.val, val_rule)


def _fingerprint_data(data: RunData) -> str:
    """The training samples, the plan that orders them and the rule that cuts them: a resume must read the same
    data in the same order."""
    plan = data.plan
    digest = hashlib.sha256(repr((plan.sources, plan.samples_per_step, plan.seed, plan.lengths is not None,
                                  data.train_rule.fingerprint())).encode())
    for sample in data.samples:
        digest.update(np.asarray(sample.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(sample.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def _fingerprint_model(cfg: TrainConfig) -> str:
    """Model source and shape, and what is trained (LoRA adapters on which base)."""
    source = cfg.model_name if cfg.model_config is None else repr(sorted(cfg.model_config.items()))
    if cfg.peft.type is not None:  # full fine-tuning keeps the fingerprint its earlier checkpoints carry
        source += repr((asdict(cfg.peft), asdict(cfg.quantization)))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _setup_logging(info: DistInfo) -> None:
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format=f"[%(asctime)s rank{info.rank}] %(levelname)s %(name)s: %(message)s",
    )


def train(cfg: TrainConfig) -> Path:
    """Run the training described by `cfg`; return the run folder."""
    clock = StartupClock()
    info = init_distributed(cfg.local_rank, cfg.deepspeed)
    _setup_logging(info)
    clock.phase("process start, imports and distributed init")
    _seed_everything(cfg.rng_seed)
    output_dir = Path(cfg.output_dir)

    tokenizer = load_tokenizer(cfg)
    clock.phase("tokenizer")
    prepared = prepare_data(cfg, tokenizer)
    clock.phase("data", f"{sum(prepared.cached)} of {len(prepared.cached)} datasets from the tokenized cache")
    data = _run_data(cfg, tokenizer, prepared, info)
    plan = data.plan
    # A fraction of an epoch trains that share of the first epoch's steps (OpenAssistant's num_train_epochs: 0.2).
    total_steps = cfg.max_steps or math.ceil(plan.steps_per_epoch * cfg.num_train_epochs)
    state = TrainerState(data_fingerprint=_fingerprint_data(data), model_fingerprint=_fingerprint_model(cfg))
    # A resume that does not fit is refused before anything is built or written.
    resume_from = _checkpoint_to_resume(cfg, state, output_dir) if cfg.resume_from_checkpoint else None
    if info.is_main and cfg.overwrite_output_dir:
        _remove_earlier_run(output_dir)

    engine = _build_engine(cfg, tokenizer, info, total_steps, clock)
    clock.phase("engine init", f"optimizer {type(engine.basic_optimizer).__name__}")
    if info.is_main:
        # Written once the run has started: a launch that fails earlier leaves no run folder behind.
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_CONFIG).write_text(to_yaml(cfg))

    chunked = _uses_chunked_loss(cfg, engine)
    if resume_from is not None:
        _resume(cfg, engine, state, resume_from)
        clock.phase("resume")
    logger.info(
        "%d training samples, %d drawn per epoch, %d steps per epoch, %d steps in all; %s on %d ranks; "
        "%s micro-batches, loss from %s",
        len(data.samples), plan.samples_per_epoch, plan.steps_per_epoch, total_steps,
        f"ZeRO stage {zero_stage(engine.config)}" if cfg.deepspeed else "plain PyTorch", info.world_size,
        "packed" if cfg.packing else "padded", "hidden states in chunks" if chunked else "logits",
    )

    metrics = MetricsLogger(cfg, output_dir, enabled=info.is_main)
    try:
        _loop(cfg, engine, tokenizer, data, state, total_steps, metrics, info, chunked, clock)
        metrics.plot_curves(state.optimizer_step)  # rank 0, after the last record; a failure only warns
        if cfg.generate_samples or cfg.generate_val_samples:
            _generate_samples(cfg, engine, tokenizer, data.val, state, metrics, info)
    finally:
        metrics.close()
    # Tear the process group down here, not at interpreter exit: ZeRO-3 on CPU ranks can otherwise abort
    # after finishing ("terminate called without an active exception") and turn a good run's exit status bad.
    dist.barrier()
    dist.destroy_process_group()
    return output_dir


def _build_engine(cfg: TrainConfig, tokenizer: Any, info: DistInfo, total_steps: int, clock: StartupClock) -> Any:
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
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.warmup_steps, total_steps, cfg.lr_scheduler_type),
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


def _remove_earlier_run(output_dir: Path) -> None:
    """`overwrite_output_dir`: the earlier run in output_dir goes before anything of this one is written."""
    removed = remove_run(output_dir)
    if removed:
        logger.warning("overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed), output_dir)


def _checkpoint_to_resume(cfg: TrainConfig, state: TrainerState, output_dir: Path) -> Path:
    """The committed checkpoint to continue from, checked before anything is built: it must exist and verify
    (every file against its manifest's hash, the ranks sharing the work, unless `verify_checkpoint_hashes` is
    off), have been saved by the same engine (DeepSpeed or not) and as many ranks, and train the same model on the
    same data in the same order."""
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
    """Load the engine, data position and RNG states of a checkpoint `_checkpoint_to_resume` accepted."""
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


def _loop(
    cfg: TrainConfig,
    engine: Any,
    tokenizer: Any,
    data: RunData,
    state: TrainerState,
    total_steps: int,
    metrics: MetricsLogger,
    info: DistInfo,
    chunked: bool,
    clock: StartupClock,
) -> None:
    engine.train()
    device = engine.device
    pad_id = tokenizer.pad_token_id
    plan = data.plan
    guard_updates = not _skips_nonfinite_updates(engine)
    progress = tqdm(total=total_steps, initial=state.optimizer_step, disable=not info.is_main, dynamic_ncols=True)
    order, order_epoch = None, -1
    pending = PendingLosses()
    first_step = state.optimizer_step + 1
    window_tokens, window_steps, window_data_time, window_start = 0, 0, 0.0, time.perf_counter()

    while state.optimizer_step < total_steps:
        step = state.optimizer_step
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = plan.epoch_order(epoch), epoch
        # Every rank knows every sample and how it is cut this epoch, so the step's token counts need no
        # communication.
        step_samples = {i: data.train_rule.apply(data.samples[i], epoch, i)
                        for i in plan.global_step_samples(order, step_in_epoch)}
        # A step whose windows hold no supervised token at all has nothing to learn; 1 keeps the division finite.
        step_supervised = max(1, sum(s.num_supervised for s in step_samples.values()))
        step_tokens = sum(len(s.input_ids) for s in step_samples.values())

        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for micro_batch in plan.micro_batches(order, step_in_epoch):
            data_start = time.perf_counter()
            # A short last step can leave this rank an empty micro-batch; it still runs one (ZeRO's forward
            # and backward are collective) whose loss weighs nothing.
            batch = [step_samples[i] for i in micro_batch] or [data.train_rule.apply(data.samples[0], epoch, 0)]
            inputs, labels = _device_batch(batch, cfg.packing, pad_id, device)
            window_data_time += time.perf_counter() - data_start
            micro_loss_sum = _token_sums(engine, inputs, labels, chunked)[0]
            if not micro_batch:
                micro_loss_sum = torch.where(torch.tensor(False), micro_loss_sum, 0.0)  # NaN * 0 would stay NaN
            loss_sum += micro_loss_sum.detach().double()
            # DeepSpeed (and DDP without it) averages gradients over ranks; x world_size turns that into a sum, so
            # the gradient is that of (sum of token losses of the whole step) / (supervised tokens of the whole step).
            engine.backward(micro_loss_sum * (info.world_size / step_supervised), scale_wrt_gas=False)
            if guard_updates and engine.is_gradient_accumulation_boundary():
                _refuse_nonfinite_update(cfg, engine, loss_sum, step)
            engine.step()
            state.micro_step += 1
        pending.add(step + 1, loss_sum, step_supervised)
        state.optimizer_step += 1
        state.tokens_seen += step_tokens
        window_tokens += step_tokens
        window_steps += 1
        progress.update(1)
        if state.optimizer_step == first_step:
            if device.type == "cuda":
                torch.cuda.synchronize()  # once: the phase ends when the device has finished the step
            clock.phase("first optimizer step")

        step = state.optimizer_step
        log_now = step % cfg.logging_steps == 0 or step == total_steps
        eval_now = (cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps
        save_now = _should_save(cfg, step, total_steps, plan.steps_per_epoch)
        if not (log_now or eval_now or save_now):
            continue
        # The losses are read only here (a host sync): the steps in between run back to back on the device.
        loss = _count_nonfinite(cfg, state, pending.read())
        record: dict[str, Any] = {}
        if log_now:
            elapsed = time.perf_counter() - window_start
            record.update(
                loss=loss,
                lr=engine.get_lr()[0],
                grad_norm=_grad_norm(engine),
                tokens=state.tokens_seen,
                tokens_per_s=window_tokens / elapsed if elapsed > 0 else 0.0,
                data_time=window_data_time / window_steps,
                epoch=round(step / plan.steps_per_epoch, 4),
                skipped_steps=state.skipped_steps,
            )
            window_tokens, window_steps, window_data_time, window_start = 0, 0, 0.0, time.perf_counter()
            progress.set_postfix(
                epoch=f"{record['epoch']:.2f}", loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
        if eval_now:
            record.update(_evaluate(cfg, engine, pad_id, data, info, chunked))
            engine.train()
        if record:
            metrics.log({"step": step, **record})
        if save_now:
            save_checkpoint(
                engine,
                Path(cfg.output_dir),
                step,
                state.state_dict(),
                cfg.save_total_limit,
                write_extra=lambda folder: _write_extra(cfg, tokenizer, engine.module, folder),
                trained_only=is_lora_model(engine.module),
            )
    progress.close()


class PendingLosses:
    """The losses of the steps not read yet, kept on the device.

    Reading a loss waits for the device (and all-reduces it); at every step that would leave the GPU idle
    between steps. The steps since the last read are read together, with one all-reduce, where a value is
    needed: logging, evaluation, checkpoints and the last step.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[int, torch.Tensor, int]] = []

    def add(self, step: int, loss_sum: torch.Tensor, supervised: int) -> None:
        """Step `step`'s summed token losses on this rank (a device tensor), and the step's supervised tokens."""
        self._steps.append((step, loss_sum, supervised))

    def read(self) -> list[tuple[int, float]]:
        """(step, loss) of every pending step, oldest first: the token mean of the whole step, all ranks."""
        if not self._steps:
            return []
        sums = torch.stack([loss_sum for _, loss_sum, _ in self._steps])
        dist.all_reduce(sums)
        losses = [(step, total / supervised) for (step, _, supervised), total in zip(self._steps, sums.tolist())]
        self._steps.clear()
        return losses


def _count_nonfinite(cfg: TrainConfig, state: TrainerState, losses: list[tuple[int, float]]) -> float:
    """Count the steps among `losses` whose loss was not finite (their updates were skipped); stop the run
    after `max_nonfinite_steps` in a row. Returns the last step's loss."""
    for step, loss in losses:
        if math.isfinite(loss):
            state.nonfinite_in_row = 0
            continue
        state.skipped_steps += 1
        state.nonfinite_in_row += 1
        logger.warning("non-finite loss at optimizer step %d: update skipped on every rank", step)
        if state.nonfinite_in_row >= cfg.max_nonfinite_steps:
            raise TrainingError(
                f"{state.nonfinite_in_row} optimizer steps in a row with a non-finite loss, the last "
                f"at step {step}; lower the learning rate or check the data, then resume"
            )
    return losses[-1][1]


def _uses_chunked_loss(cfg: TrainConfig, engine: Any) -> bool:
    """Whether the loss comes from the last hidden states chunk by chunk (`chunked_loss`) or from full logits.

    Full logits under ZeRO-3, whose partitioned output head is whole only inside the model's own forward, and
    for LoRA, where peft's trained token rows change what the head computes. The chunked loss applies the head's
    weight alone, so a head with a bias (no model this trainer ships a section for) is refused.
    """
    if not cfg.chunked_loss or zero_stage(engine.config) == 3 or is_lora_model(engine.module):
        return False
    if getattr(engine.module.get_output_embeddings(), "bias", None) is not None:
        raise ConfigError("chunked_loss=true needs an output head without a bias; set chunked_loss=false")
    return True


def _device_batch(
    samples: list[FormattedSample], packing: bool, pad_id: int, device: torch.device
) -> tuple[dict[str, Any], torch.Tensor]:
    """`collate`'s batch of `samples`: the model's keyword inputs on `device`, and the labels on the host.

    The labels stay on the host, where the loss finds the supervised positions (and counts them) without
    waiting for the device; the inputs are queued behind the work in flight, so building the next batch never
    waits for the device either (and `data_time` is host time).
    """
    batch = collate(samples, packing, pad_id, PAD_TO_MULTIPLE_OF)
    labels = batch.pop("labels")
    inputs = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return inputs, labels


def _token_sums(
    engine: Any, inputs: dict[str, Any], labels: torch.Tensor, chunked: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, correct next-token predictions) over the supervised tokens of a batch."""
    if not chunked:
        return supervised_token_sums(engine(**inputs).logits, labels)
    # Still the engine's forward, so DeepSpeed's hooks run; an empty `logits_to_keep` projects no position, and
    # the hidden states after the final norm, the head's input, come back instead of (tokens, vocabulary) logits.
    no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    outputs = engine(**inputs, output_hidden_states=True, logits_to_keep=no_position)
    head = engine.module.get_output_embeddings().weight
    return chunked_supervised_token_sums(outputs.hidden_states[-1], head, labels)


def _skips_nonfinite_updates(engine: Any) -> bool:
    """Whether the engine itself skips an update whose gradients are not finite.

    DeepSpeed's ZeRO-1/2 skip a step whose gradient norm is not finite (fp32, and bf16 with check_grad_overflow),
    and fp16's loss scaler skips it at any stage; ZeRO-0 and ZeRO-3 in bf16/fp32 do not. The plain PyTorch
    engine skips it as ZeRO-1/2 do.
    """
    return isinstance(engine, TorchEngine) or engine.fp16_enabled() or zero_stage(engine.config) in (1, 2)


def _refuse_nonfinite_update(cfg: TrainConfig, engine: Any, loss_sum: torch.Tensor, step: int) -> None:
    """Stop before an update that DeepSpeed would apply despite a non-finite loss on some rank (a host sync
    on every step, paid only where DeepSpeed does not skip such updates itself)."""
    flag = (~torch.isfinite(loss_sum)).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise TrainingError(
            f"non-finite loss at optimizer step {step + 1}; ZeRO stage {zero_stage(engine.config)} in {cfg.dtype} "
            "cannot skip the update, so training stops before it is applied; resume from the last checkpoint"
        )


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _should_save(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> bool:
    if cfg.save_strategy == "no":
        return False
    if step == total_steps:
        return True
    if cfg.save_strategy == "epoch":
        return step % steps_per_epoch == 0
    return step % cfg.save_steps == 0


def _write_extra(cfg: TrainConfig, tokenizer: Any, model: Any, folder: Path) -> None:
    """What export and inspection need beside the engine state: the merged config, the tokenizer with its
    chat template, the model's transformers config (vocabulary size after the resize included) and, for a
    LoRA run, the adapter's peft config with the base it applies to."""
    (folder / RUN_CONFIG).write_text(to_yaml(cfg))
    tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    model.config.save_pretrained(folder / MODEL_CONFIG_DIR)
    model.generation_config.save_pretrained(folder / MODEL_CONFIG_DIR)
    if is_lora_model(model):
        adapter = model.peft_config[ADAPTER_NAME]
        adapter.base_model_name_or_path = base_model_reference(cfg, Path(cfg.output_dir))
        adapter.save_pretrained(folder / ADAPTER_DIR)


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


@torch.no_grad()
def _evaluate(
    cfg: TrainConfig, engine: Any, pad_id: int, data: RunData, info: DistInfo, chunked: bool
) -> dict[str, float]:
    """Loss and next-token accuracy on supervised tokens of each validation set, in a fixed order.

    Each set is its first `eval_size` samples (all without it), each cut by the validation rule, alike at every
    evaluation. Rank r takes samples r, r + world, ...; every rank runs the same number of batches (a rank
    short of samples runs one more batch and does not count it), since ZeRO-3 forwards are collective.
    """
    engine.eval()
    results: dict[str, float] = {}
    for split in data.val:
        samples = [data.val_rule.apply(s, EVALUATION, j) for j, s in enumerate(split.samples[: cfg.eval_size])]
        if not samples:
            continue
        mine = samples[info.rank :: info.world_size]
        per_rank = math.ceil(len(samples) / info.world_size)
        num_batches = math.ceil(per_rank / cfg.per_device_eval_batch_size)
        sums = torch.zeros(3, dtype=torch.float64, device=engine.device)  # loss, correct, supervised tokens
        for b in range(num_batches):
            chunk = mine[b * cfg.per_device_eval_batch_size : (b + 1) * cfg.per_device_eval_batch_size]
            inputs, labels = _device_batch(chunk or samples[:1], cfg.packing, pad_id, engine.device)
            loss_sum, correct = _token_sums(engine, inputs, labels, chunked)
            if chunk:
                supervised = torch.tensor(count_supervised(labels), dtype=torch.float64, device=engine.device)
                sums += torch.stack([loss_sum.double(), correct.double(), supervised])
        dist.all_reduce(sums)
        results[f"eval/{split.name}/loss"] = (sums[0] / sums[2]).item()
        results[f"eval/{split.name}/accuracy"] = (sums[1] / sums[2]).item()
    return results


def run_or_exit(cfg: TrainConfig) -> int:
    """`train`, with the failures a user can act on reported as one clear line and exit status 1."""
    try:
        train(cfg)
    except (TrainingError, CheckpointError) as err:
        logger.error("%s", err)
        return 1
    return 0
