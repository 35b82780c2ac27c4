"""The starting model of a run whose `model_name` is a training checkpoint, or a run folder (its newest complete
checkpoint): how the preference stages start from an SFT run without a separate export (and PPO from its reward
model's run, `model_folder`).

Rank 0 exports the checkpoint once (export/export.py: any ZeRO layout, streamed, in the run's dtype; the command line
hands the exporter to the recipe, `Exporter`, so that training/ does not import export/) into the run folder's
`start_model/`, a Hugging Face folder with the tokenizer, from which the tokenizer and the model are then
loaded like any other. An export already there is reused while it comes from the same checkpoint, the same folder
with the same manifest (its `source.txt`), so a resume does not export again; one from another checkpoint, or from a
checkpoint saved again at the same path by another run, is replaced.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from model_training.checkpoints.read import CheckpointError, resolve_checkpoint
from model_training.config import PROJECT_ROOT, ConfigError, TrainConfig, resolve_input_path
from model_training.hub import is_hub_id
from model_training.layout import MANIFEST, START_MODEL_DIR, TOKENIZER_DIR, is_training_run
from model_training.training.distributed import DistInfo

logger = logging.getLogger(__name__)

Exporter = Callable[[Path, Path, str], None]
"""`export(checkpoint, target, dtype)`: a committed checkpoint into the Hugging Face folder `target`, in `dtype`
(export/export.py's `export_start_model`); CheckpointError, ValueError or OSError when it cannot."""

SOURCE_FILE = "source.txt"
"""In start_model/: the checkpoint it was exported from."""


def start_model_config(cfg: TrainConfig, info: DistInfo, export: Exporter) -> TrainConfig:
    """`cfg` to load the tokenizer and the model with: `cfg` itself, or, when `model_name` is a training checkpoint
    or run folder, `cfg` with `model_name` its export (module docstring). Call on every rank; ConfigError on every
    rank when the checkpoint cannot be exported."""
    if cfg.model_name is None:
        return cfg
    return replace(cfg, model_name=model_folder(cfg.model_name, "model_name", START_MODEL_DIR, cfg, info, export))


def tokenizer_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` to load the run's tokenizer with before any export (every check that needs it comes before the minutes
    of an export): when `model_name` is a training checkpoint or run folder, its checkpoint's tokenizer folder."""
    if cfg.tokenizer_name is not None or cfg.model_name is None or training_run(cfg.model_name) is None:
        return cfg
    return replace(cfg, tokenizer_name=saved_folder(cfg.model_name, "model_name", TOKENIZER_DIR))


def saved_folder(name: str, key: str, sub: str) -> str:
    """Where the model that config key `key` names (`name`) keeps `sub` (its tokenizer or model config folder) without
    an export: for a training checkpoint or run folder, that folder of its newest checkpoint; else `name` itself."""
    folder = training_run(name)
    if folder is None:
        return name
    try:
        return str(resolve_checkpoint(folder, folder) / sub)
    except CheckpointError as err:
        raise ConfigError(f"key '{key}': {err}") from None


def model_folder(name: str, key: str, export_dir: str, cfg: TrainConfig, info: DistInfo, export: Exporter) -> str:
    """The model that config key `key` names (`name`) as a hub id or folder to load from: `name` itself, or, when it
    is a training checkpoint or run folder, its export into `output_dir/export_dir` (module docstring). Call on
    every rank; ConfigError on every rank when the checkpoint cannot be exported."""
    folder = training_run(name)
    if folder is None:
        return name
    target = Path(cfg.output_dir).absolute() / export_dir
    shared = [_export_once(folder, target, cfg.dtype, key, export) if info.is_main else None]
    # Also the barrier: the other ranks load the export only once rank 0 has written it.
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise ConfigError(shared[0])
    return str(target)


def training_run(name: str) -> Path | None:
    """The training checkpoint or run folder a model name refers to; None for a hub id or a model folder."""
    if is_hub_id(name, PROJECT_ROOT):
        return None
    folder = resolve_input_path(name)
    return folder if is_training_run(folder) else None


def _export_once(folder: Path, target: Path, dtype: str, key: str, export: Exporter) -> str | None:
    """Export the checkpoint `folder` names into `target` unless it holds that export already; the error's message."""
    try:
        checkpoint = resolve_checkpoint(folder, folder).resolve()
        # The manifest holds every file's hash: a checkpoint saved again at this path has another one.
        source = f"{checkpoint}\n{hashlib.sha256((checkpoint / MANIFEST).read_bytes()).hexdigest()}\n"
        if (target / SOURCE_FILE).is_file() and (target / SOURCE_FILE).read_text() == source:
            logger.info("starting model: %s, exported from %s before", target, checkpoint)
            return None
        export(checkpoint, target, dtype)
        # Written after the folder is whole: an export cut short has none, and is done again.
        (target / SOURCE_FILE).write_text(source)
    except (CheckpointError, ValueError, OSError) as err:  # export/'s ExportError is a ValueError
        return f"key '{key}': cannot start from the training checkpoint {folder}: {err}"
    logger.info("starting model: %s exported into %s (%s)", checkpoint, target, dtype)
    return None
