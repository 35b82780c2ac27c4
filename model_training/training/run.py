"""What every recipe does around its loop: the start-up, the run folder, the engine, the metrics and the exit.

A recipe (`trainer.train` for SFT, the reward model and DPO; `ppo.recipe.train_rl` for PPO and GRPO) is its own
steps between these, in this order:
  1. `launch(cfg, body)`: listening for a stop signal from the start (preemption.py), holding the output folder's
     lock (run_lock.py), then `body(cfg, stop)`;
  2. `start_run(cfg)`: the process group, logging, seeds, and the clock that times each start-up phase;
  3. the recipe's tokenizer, data, counters and fingerprints, and the resume it chooses (resume.py);
  4. `clear_earlier_run`, the engine (`build_engine`), `record_config` once the engine stands;
  5. `logged_loop`: the recipe's loop with the run's metrics logger, the training curves after it, the summary on
     stdout, and the process group left;
and `run_or_exit` around all of it turns the failures a user can act on into one line and an exit status.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import deepspeed
import psutil
import torch
import torch.distributed as dist

from model_training.checkpoints.read import CheckpointError
from model_training.config import TrainConfig, to_yaml
from model_training.data.build import PreparationStopped
from model_training.layout import BASE_MODEL_DIR, RUN_CONFIG, record_run_file, remove_run
from model_training.models.builder import build_model
from model_training.training.checkpoint import seed_everything
from model_training.training.distributed import DistInfo, LaunchError, init_distributed
from model_training.training.ds_config import build_deepspeed_config, clean_cuda_arch_list
from model_training.training.metrics import MetricsLogger
from model_training.training.preemption import (
    EXIT_STOPPED,
    Stopped,
    StopRequest,
    describe_exited,
    exited_ranks,
    note_sibling_ranks,
    run_stoppable,
)
from model_training.training.report import run_summary
from model_training.training.run_lock import holding_output_dir
from model_training.training.schedule import build_scheduler
from model_training.training.step import TrainingError
from model_training.training.torch_engine import build_torch_engine

logger = logging.getLogger(__name__)


class FieldsState:
    """`state_dict` / `load_state_dict` of a dataclass whose every field is what a resume restores (the counters
    saved in trainer_state.json: SFT's and the preference stages' `TrainerState`, PPO's `RlState`)."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every field the checkpoint holds; a field added since it was saved keeps the value it has."""
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class StartupClock:
    """Seconds of each startup phase, logged (by rank 0) as each one ends, so a slow start shows where."""

    def __init__(self) -> None:
        # The first phase counts from the process's start (the interpreter, the imports), which only the OS knows.
        self.last = time.perf_counter() - (time.time() - psutil.Process().create_time())

    def phase(self, name: str, detail: str = "") -> None:
        now = time.perf_counter()
        logger.info("startup: %s %.1f s%s", name, now - self.last, f" ({detail})" if detail else "")
        self.last = now


def launch(cfg: TrainConfig, body: Callable[[TrainConfig, StopRequest], Path]) -> Path:
    """`body(cfg, stop)` with a stop request listening from the very start (a signal during the minutes of start-up
    counts too) and the output folder's lock held; returns what it returns, the run folder."""
    return run_stoppable(cfg.stop_grace_period, lambda stop: holding_output_dir(cfg, partial(body, cfg, stop)))


class Startup(NamedTuple):
    """What `start_run` made: this process's place in the job, and the clock of the start-up phases."""

    info: DistInfo
    clock: StartupClock


def start_run(cfg: TrainConfig, deepspeed_engine: bool) -> Startup:
    """The process group (deepspeed launcher, torchrun or srun), logging by rank, and every random generator seeded
    from `rng_seed`."""
    clock = StartupClock()
    info = init_distributed(cfg.local_rank, deepspeed_engine)
    note_sibling_ranks()  # every rank of the node runs now; one may exit during the data preparation that follows
    setup_logging(info)
    clock.phase("process start, imports and distributed init")
    seed_everything(cfg.rng_seed)
    return Startup(info, clock)


def setup_logging(info: DistInfo) -> None:
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format=f"[%(asctime)s rank{info.rank}] %(levelname)s %(name)s: %(message)s",
    )


def clear_earlier_run(cfg: TrainConfig, info: DistInfo) -> None:
    """`overwrite_output_dir`: rank 0 removes the earlier run in output_dir before anything of this one is written
    (after the resume was chosen: a resume keeps the run it continues)."""
    if not (info.is_main and cfg.overwrite_output_dir):
        return
    removed = remove_run(Path(cfg.output_dir))
    if removed:
        logger.warning("overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed), cfg.output_dir)


def record_config(cfg: TrainConfig, info: DistInfo) -> None:
    """The merged config into the run folder, by rank 0, once the engine stands: a launch that fails earlier leaves
    no run folder behind."""
    if info.is_main:
        output_dir = Path(cfg.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        record_run_file(output_dir, RUN_CONFIG).write_text(to_yaml(cfg))


def build_engine(
    cfg: TrainConfig,
    tokenizer: Any,
    info: DistInfo,
    total_steps: int,
    clock: StartupClock,
    load_universal: bool = False,
    reward_head: bool | None = None,
) -> Any:
    """The model inside its engine: DeepSpeed's, or without DeepSpeed the plain PyTorch one (torch_engine.py),
    each with PyTorch's AdamW and our schedule. `load_universal`: the engine will load a checkpoint of another number
    of ranks through its universal conversion (reshard.py). `reward_head`: models/builder.py's (None: the stage's)."""
    # A LoRA checkpoint holds only the adapters: a random-weight base must be kept for the export.
    keep_base = cfg.peft.type is not None and cfg.model_config is not None and cfg.save_strategy != "no"
    save_base_to = Path(cfg.output_dir) / BASE_MODEL_DIR if keep_base and info.is_main else None
    if not cfg.deepspeed:
        model = build_model(cfg, tokenizer, {}, save_base_to, reward_head)
        clock.phase("model build")
        return build_torch_engine(model, cfg, info.world_size, total_steps)
    ds_config = build_deepspeed_config(cfg, info.world_size, cuda=torch.cuda.is_available(), total_steps=total_steps)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    model = build_model(cfg, tokenizer, ds_config, save_base_to, reward_head)
    clock.phase("model build")
    clean_cuda_arch_list()  # before DeepSpeed builds an op (the offloaded optimizer's CPU Adam)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.warmup_steps, total_steps, cfg.lr_scheduler_type,
                                                 cfg.lr_decay_steps, cfg.min_lr_ratio),
    )
    return engine


@dataclass(frozen=True)
class LoopResult:
    """What a recipe's loop reports for the run's summary."""

    last_step: int
    """The step counter at the end (the curves are drawn up to it)."""
    tokens: int
    """Tokens this process's loop went through, all ranks: SFT's trained tokens, PPO's generated ones."""


def logged_loop(
    cfg: TrainConfig,
    info: DistInfo,
    loop: Callable[[MetricsLogger], LoopResult],
    after: Callable[[MetricsLogger], None] | None = None,
) -> None:
    """`loop(metrics)` with the run's metrics logger, then the training curves and `after(metrics)` (SFT's sample
    answers), the summary on stdout (rank 0) timed on the loop alone, and the process group left."""
    metrics = MetricsLogger(cfg, Path(cfg.output_dir), enabled=info.is_main)
    try:
        loop_start = time.perf_counter()
        result = loop(metrics)
        loop_seconds = time.perf_counter() - loop_start
        metrics.plot_curves(result.last_step)  # rank 0, after the last record; a failure only warns
        if after is not None:
            after(metrics)
    finally:
        metrics.close()
    if info.is_main:
        print_summary(Path(cfg.output_dir), result.last_step, result.tokens, loop_seconds)
    leave_process_group()


def print_summary(output_dir: Path, steps: int, tokens: int, train_seconds: float) -> None:
    """The run's summary on stdout (report.py), timed from the process's start."""
    wall = time.time() - psutil.Process().create_time()
    print("\n".join(run_summary(output_dir, steps, wall, tokens, train_seconds)), flush=True)


def leave_process_group() -> None:
    """Tear the process group down here, not at interpreter exit: ZeRO-3 on CPU ranks can otherwise abort after
    finishing ("terminate called without an active exception") and turn a good run's exit status bad."""
    dist.barrier()
    dist.destroy_process_group()


def run_or_exit(cfg: TrainConfig, run: Callable[[TrainConfig], Path]) -> int:
    """`run(cfg)` (a stage's recipe), with the failures a user can act on reported as one clear line and exit status
    1, and a stop on a signal as EXIT_STOPPED."""
    try:
        run(cfg)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)  # before any logging is set up
        return 1
    except (TrainingError, CheckpointError) as err:
        logger.error("%s", err)
        return 1
    except Stopped:
        return EXIT_STOPPED
    except (dist.DistError, RuntimeError, PreparationStopped) as err:
        gone = exited_ranks()
        if gone:
            # A collective with a rank that died fails on the others ("Connection reset by peer", a page of gloo's
            # text), and the launcher stops a rank's data preparation once another exited: which rank it was helps.
            logger.error("%s", describe_exited(gone))
            return 1
        if not isinstance(err, PreparationStopped):
            raise
        logger.warning("stopped (received %s) during the data preparation: the chunks it finished stay for the next "
                       "start; exit status %d: run the same command again to continue", err, EXIT_STOPPED)
        return EXIT_STOPPED
    return 0
