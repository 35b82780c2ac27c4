"""What a run may do with its `output_dir`, checked before it writes anything: an earlier run there is resumed or
replaced on request only, no file of the user's is written over or removed, and no input of the run lies where
the run writes. Every rank checks alike, before any process group; rank 0 checks the earlier run again once it
holds the folder's lock (training/run_lock.py), since another launch may have started meanwhile."""

from __future__ import annotations

from pathlib import Path

from model_training.config import ConfigError, TrainConfig, resolve_input_path
from model_training.layout import (
    BASE_MODEL_DIR,
    CHECKPOINT_RE,
    CURVES,
    METRICS,
    POINTER,
    ROLLOUT_SAMPLES,
    RUN_CONFIG,
    RUN_FILES,
    RUN_LOCK,
    SAMPLES_JSONL,
    SAMPLES_MD,
    START_MODEL_DIR,
    START_REWARD_MODEL_DIR,
    START_VALUE_MODEL_DIR,
    TRANSIENT_RE,
    earlier_run,
    foreign_files,
)
from model_training.stages import STAGES

RUN_NAMES = (RUN_CONFIG, METRICS, POINTER, SAMPLES_JSONL, SAMPLES_MD, ROLLOUT_SAMPLES, CURVES, BASE_MODEL_DIR,
             START_MODEL_DIR, START_REWARD_MODEL_DIR, START_VALUE_MODEL_DIR, RUN_FILES, RUN_LOCK)
"""The names a run may write in its folder besides its checkpoints (layout.py)."""


def is_run_name(name: str) -> bool:
    """Whether a run writes (or may write) an entry of this name in its folder: a file of RUN_NAMES, a checkpoint."""
    return name in RUN_NAMES or bool(CHECKPOINT_RE.fullmatch(name) or TRANSIENT_RE.fullmatch(name))


def check_output_dir(cfg: TrainConfig, config_file: Path | None) -> None:
    """ConfigError, before anything is written, when the run would mix with or replace an earlier run without being
    asked to, write over a file of the user's, or write where one of its inputs lies."""
    refuse_to_mix_runs(cfg)
    _refuse_inputs_where_the_run_writes(cfg, config_file)
    _refuse_to_write_over_user_files(cfg)


def refuse_to_mix_runs(cfg: TrainConfig) -> None:
    """ConfigError when `output_dir` holds an earlier run that this one, neither resuming it nor asked to
    overwrite it, would mix with or replace."""
    if cfg.resume_from_checkpoint and cfg.overwrite_output_dir:
        raise ConfigError("set either 'resume_from_checkpoint' (continue the run in output_dir) or "
                          "'overwrite_output_dir' (replace it), not both")
    found = earlier_run(Path(cfg.output_dir))
    if found and not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(
            f"key 'output_dir' is '{cfg.output_dir}', which holds an earlier run ({shown}); resume it with "
            "--resume_from_checkpoint, choose another output_dir, or set overwrite_output_dir=true to replace it"
        )


def _refuse_to_write_over_user_files(cfg: TrainConfig) -> None:
    """A file at a name the run writes that no run wrote (a `samples.md` of the user's) stays the user's."""
    names = [RUN_CONFIG, CURVES]
    if cfg.generate_samples or cfg.generate_val_samples:
        names += [SAMPLES_JSONL, SAMPLES_MD]
    names += STAGES[cfg.stage].run_files
    if cfg.peft.type is not None and cfg.model_config is not None:
        names.append(BASE_MODEL_DIR)
    found = foreign_files(Path(cfg.output_dir), names)
    if found:
        raise ConfigError(
            f"key 'output_dir' is '{cfg.output_dir}', which holds {', '.join(found)} that no run wrote; the run "
            "would write its own there: move them, or choose another output_dir"
        )


def _refuse_inputs_where_the_run_writes(cfg: TrainConfig, config_file: Path | None) -> None:
    """An input file inside output_dir under a name the run writes (its `config.yaml`, a checkpoint) would be
    written over, or removed by an overwrite."""
    inputs = [("--config_file", str(config_file) if config_file else None), ("deepspeed_config", cfg.deepspeed_config),
              ("ppo.prompt_file", cfg.ppo.prompt_file)]
    inputs += [(f"datasets ({spec.name}) input_file_path", spec.options.input_file_path) for spec in cfg.dataset_specs]
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    for key, value in inputs:
        if not value:
            continue
        path = (Path(value) if key == "--config_file" else resolve_input_path(value)).resolve()
        if output_dir not in path.parents:
            continue
        name = path.relative_to(output_dir).parts[0]
        if is_run_name(name):
            raise ConfigError(
                f"{key} is '{value}', which lies in output_dir '{cfg.output_dir}' where the run writes its {name}; "
                "move the file out of output_dir, or choose another output_dir"
            )
