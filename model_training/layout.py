"""Where a run keeps what it writes: the one place that names the files of a run folder and of a checkpoint.

A run folder (`output_dir`)::

    config.yaml                 the merged config the run started with
    metrics.jsonl               one record per logging step (training/metrics.py); a resume appends to it
    latest                      pointer: the name of the newest committed checkpoint, updated last
    checkpoint-000080/          one committed checkpoint per save (training/checkpoint.py; read: checkpoints/read.py)
    .staging-checkpoint-000100/ a save in progress or a crashed one; cleared by the next save
    .deleting-checkpoint-000040/ a checkpoint being removed; never loaded
    samples.jsonl, samples.md   answers generated after training (training/samples.py)
    rollout_samples.jsonl       PPO: continuations of each logged step with their scores (training/ppo/)
    training_curves.png         loss, learning rate, tokens/s and grad norm against steps
    base_model/                 a LoRA run's random-weight base, kept for its export
    start_model/                a `model_name` that is a training checkpoint, exported to start from
                                (training/start.py; replaced when stale, so an overwrite keeps it)
    start_reward_model/, start_value_model/   the same for PPO's `ppo.reward_model` and `ppo.value_model`
    .run-files                  the names above that the run wrote, one a line: an overwrite removes these (and the
                                checkpoints, their pointer, the metrics) and nothing else
    .run.lock                   held while a run writes into the folder (training/run_lock.py)

A checkpoint folder::

    manifest.json               written last, before the commit: files, sizes, hashes, step, world size
    trainer_state.json          the trainer's counters and data position (rank 0)
    rng/rank-00000.pt           python, numpy, torch (and CUDA) RNG states, one file per rank
    global_step80/...           the engine's state, in one of two layouts:
      DeepSpeed (deepspeed=true): model, optimizer shards (one per rank under ZeRO-1/2/3), lr scheduler,
                                  in DeepSpeed's own files (read by checkpoints/zero.py)
      plain PyTorch (deepspeed=false), written by rank 0, the state being the same on every rank:
        torch_model_states.pt   {"module": the model's state dict}: the fp32 weights, by the model's own
                                names (a LoRA run: the trained tensors only)
        torch_optim_states.pt   {"optimizer": AdamW's state dict, "lr_scheduler": the LambdaLR's}
    config.yaml                 the merged config
    tokenizer/                  the tokenizer with the chat tokens and chat template
    model_config/               the model's transformers config and generation config
    adapter/                    a LoRA run's peft config, naming the base it applies to
    value/global_step80/...     PPO (trainer_rl.py): the value model's engine state, beside the policy's above
    value/model_config/         the value model's transformers config
    universal/                  added after the commit, the first time the checkpoint is resumed on another number
                                of ranks (training/reshard.py): its ZeRO shards rewritten as DeepSpeed's universal
                                checkpoint, with a manifest of its own (SFT, rm, dpo; PPO resumes on as many ranks)
      global_step80/zero/<parameter>/fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt
      global_step80/zero/optimizer_state.pt, and the model-states file (without the weights)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
POINTER = "latest"
SAMPLES_JSONL = "samples.jsonl"
SAMPLES_MD = "samples.md"
ROLLOUT_SAMPLES = "rollout_samples.jsonl"
CURVES = "training_curves.png"
BASE_MODEL_DIR = "base_model"
START_MODEL_DIR = "start_model"
START_REWARD_MODEL_DIR = "start_reward_model"
START_VALUE_MODEL_DIR = "start_value_model"
RUN_FILES = ".run-files"
RUN_LOCK = ".run.lock"
VALUE_MODEL_DIR = "value"

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"
MODEL_CONFIG_DIR = "model_config"
ADAPTER_DIR = "adapter"
TORCH_MODEL_STATES = "torch_model_states.pt"
TORCH_OPTIM_STATES = "torch_optim_states.pt"
UNIVERSAL_DIR = "universal"
ZERO12_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO_OPTIM_SHARD_RE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
"""DeepSpeed's optimizer shard of one rank (ZeRO-1/2/3; bf16 runs prefix it with "bf16_", the content is the same)."""

CHECKPOINT_RE = re.compile(r"checkpoint-(\d{6,})")
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"
TRANSIENT_RE = re.compile(r"\.(staging|deleting)-checkpoint-\d{6,}")
"""Checkpoint folders in transit; only these are ever cleared without being a committed checkpoint."""


def zero3_model_states(rank: int) -> str:
    """DeepSpeed's ZeRO-3 model-states file of `rank` (shapes, buffers, the rank's partition of frozen weights)."""
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint of ``step``; zero-padded so that names sort like steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"checkpoint-{step:06d}"


def is_training_run(folder: Path) -> bool:
    """Whether `folder` is a training checkpoint or a run folder that holds checkpoints, rather than a model."""
    if (folder / MANIFEST).is_file() or (folder / POINTER).is_file():
        return True
    return folder.is_dir() and any(CHECKPOINT_RE.fullmatch(p.name) for p in folder.iterdir())


def earlier_run(output_dir: Path) -> list[str]:
    """What shows that ``output_dir`` already holds a run: its checkpoints, their pointer, its metrics."""
    if not output_dir.is_dir():
        return []
    return sorted(
        p.name for p in output_dir.iterdir()
        if p.name in (POINTER, METRICS) or CHECKPOINT_RE.fullmatch(p.name) or TRANSIENT_RE.fullmatch(p.name)
    )


def record_run_file(output_dir: Path, name: str) -> Path:
    """``output_dir / name``, listed in the folder's RUN_FILES as written by the run (call before writing it)."""
    if name not in run_files(output_dir):
        with open(output_dir / RUN_FILES, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    return output_dir / name


def run_files(output_dir: Path) -> list[str]:
    """The names RUN_FILES lists: what a run wrote into ``output_dir`` besides its checkpoints and metrics."""
    try:
        return (output_dir / RUN_FILES).read_text(encoding="utf-8").split()
    except FileNotFoundError:
        return []


LEGACY_RUN_FILES = (RUN_CONFIG, SAMPLES_JSONL, SAMPLES_MD, ROLLOUT_SAMPLES, CURVES, BASE_MODEL_DIR)
"""The names a run wrote into its folder before RUN_FILES listed them: a folder with an earlier run and no list is
taken to have written these."""


def foreign_files(output_dir: Path, names: list[str]) -> list[str]:
    """Those of ``names`` that exist in ``output_dir`` and that no run wrote (the user's own files)."""
    if not (output_dir / RUN_FILES).exists() and earlier_run(output_dir):
        return []
    written = run_files(output_dir)
    return [name for name in names if name not in written and (output_dir / name).exists()]


def remove_run(output_dir: Path) -> list[str]:
    """Delete the files a run wrote into ``output_dir`` (and nothing else there), its RUN_FILES last; return their
    names."""
    written = run_files(output_dir) if (output_dir / RUN_FILES).exists() else LEGACY_RUN_FILES
    owned = {*written, *earlier_run(output_dir)}
    removed = []
    for name in sorted(owned):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    (output_dir / RUN_FILES).unlink(missing_ok=True)
    return removed
