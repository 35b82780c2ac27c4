"""Resume on another number of ranks: a checkpoint's per-rank ZeRO shards converted, once, into DeepSpeed's universal
checkpoint, kept beside them.

A ZeRO-1/2/3 checkpoint holds one optimizer shard per rank, cut for the number of ranks that saved it. DeepSpeed loads
any number of ranks from its *universal* checkpoint instead: one folder per trained parameter with its whole fp32
weights, Adam moments and step (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``), the
optimizer's shared settings (``zero/optimizer_state.pt``) and the model-states file (scheduler, counters), which an
engine built with ``"checkpoint": {"load_universal": true}`` cuts for its own ranks as it loads.

The first resume on another number of ranks writes that folder as ``universal/`` inside the checkpoint folder
(layout.py), and every later one reuses it. DeepSpeed ships a converter,
``deepspeed/checkpoint/ds_to_universal.py``: it reads each rank's shard whole into one process (the fp32 weights and
both moments of the rank's part of the model) and writes every value twice (fragments, then merged), while the other
ranks would wait in a collective. This one streams and shares the work: every rank maps the shards
(checkpoints/zero.py's reader: no value is read before it is needed), the parameters are dealt out over the ranks
by size, and each rank reads one parameter's values at a time and writes them once. Its files hold what
ds_to_universal writes for the engines this trainer builds (tested), less the module weights of the model-states
file, which ``load_universal`` does not read.

The conversion commits like a checkpoint (checkpoint.py): staged in ``.staging-universal/``, every rank's files hashed
into a manifest of its own, one atomic rename; a crash leaves the checkpoint as it was, and the next resume starts the
conversion again. DeepSpeed's universal load restores what the optimizer owns: frozen parameters and buffers keep the
values the model was built with, which are the checkpoint's too (frozen weights never change, and a LoRA run's base
comes from its model on every resume).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.constants import PARAM

from model_training.checkpoints.ranks import current_rank, current_world_size, gather_from_ranks
from model_training.checkpoints.read import (
    FORMAT_VERSION,
    CheckpointError,
    deal_by_size,
    file_digest,
    holds_rank_shards,
    verify_checkpoint,
    verify_hashes_on_ranks,
)
from model_training.checkpoints.zero import (
    ADAM_MOMENTS,
    LazyTensor,
    OptimizerState,
    ZeroCheckpointError,
    read_optimizer_state,
)
from model_training.console import ranks
from model_training.layout import STAGING_PREFIX, UNIVERSAL_DIR, ZERO12_MODEL_STATES, zero3_model_states
from model_training.training.checkpoint import commit_folder, describe_error, relative_name

logger = logging.getLogger(__name__)

ZERO_DIR = "zero"
"""The universal checkpoint's folder of per-parameter states, inside its tag folder (DeepSpeed's name)."""
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
_SHARDED_KEYS = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings", "fp32_flat_groups",
                 "optimizer_state_dict")
"""What rank 0's optimizer state holds per rank (or per parameter): left out of the shared optimizer_state.pt."""


def needs_universal(ckpt: Path, world_size: int) -> bool:
    """Whether resuming `ckpt` on `world_size` ranks goes through the universal conversion: it was saved by another
    number of ranks and its engine state is cut per rank."""
    manifest = verify_checkpoint(ckpt)
    return manifest["world_size"] != world_size and holds_rank_shards(manifest)


def convert_for_any_ranks(ckpt: Path, folders: list[Path], verify_hashes: bool) -> float:
    """Make (or reuse) the universal conversion of each engine folder of `ckpt` in `folders` (the checkpoint folder
    itself; a checkpoint of several engines has one folder each, as PPO's value/); returns the seconds it took. Call on
    every rank: the ranks share the work.

    A conversion made by an earlier resume is checked like a checkpoint (every file against its manifest's hash when
    `verify_hashes`, the ranks sharing the reading). Raises CheckpointError, on every rank alike, when a rank fails.
    """
    start = time.perf_counter()
    tag = verify_checkpoint(ckpt)["deepspeed_tag"]
    for folder in folders:
        target = folder / UNIVERSAL_DIR
        # Rank 0's view decides, so that every rank takes the same path (all see the same shared filesystem).
        if gather_from_ranks(_committed(target))[0]:
            verify_hashes_on_ranks(target) if verify_hashes else verify_checkpoint(target)
            logger.info("resharding: reusing the universal conversion %s", target)
            continue
        _convert(folder, tag, target)
    return time.perf_counter() - start


def _committed(folder: Path) -> bool:
    try:
        verify_checkpoint(folder)
    except CheckpointError:
        return False
    return True


def _convert(folder: Path, tag: str, target: Path) -> None:
    """Convert `folder`'s shards of `tag` into `target`, staged and committed (module docstring); every rank."""
    staging = folder / (STAGING_PREFIX + UNIVERSAL_DIR)
    error = _prepare(staging) if current_rank() == 0 else None
    _raise_if_failed(gather_from_ranks(describe_error(error)), target, "preparing its staging folder")
    try:
        state = read_optimizer_state(folder / tag)
    except ZeroCheckpointError as err:
        raise CheckpointError(f"cannot convert {folder / tag} for another number of ranks: {err}") from None
    digests, error = _write_share(state, staging, tag)
    reports = gather_from_ranks((describe_error(error), digests))
    if current_rank() == 0 and any(message is not None for message, _ in reports):
        shutil.rmtree(staging, ignore_errors=True)  # every rank is past its writes: the space can go
    _raise_if_failed([message for message, _ in reports], target, "writing")
    if current_rank() == 0:
        error = _commit(staging, target, tag, state, {name: d for _, digests in reports for name, d in digests.items()})
    _raise_if_failed(gather_from_ranks(describe_error(error)), target, "committing")
    logger.info("resharding: converted %s (ZeRO-%d shards of %s) into %s", folder / tag, state.zero_stage,
                ranks(state.world_size), target)


def _prepare(staging: Path) -> BaseException | None:
    """Rank 0: an empty staging folder, what a crashed conversion left removed; the error, if any."""
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        return exc
    return None


def _raise_if_failed(messages: list[str | None], target: Path, what: str) -> None:
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(messages) if message is not None]
    if failed:
        raise CheckpointError(
            f"the conversion for another number of ranks into {target} failed while {what} ({'; '.join(failed)}); "
            "the checkpoint itself is untouched"
        )


def _write_share(state: OptimizerState, staging: Path, tag: str) -> tuple[dict[str, dict], BaseException | None]:
    """This rank's parameters (and on rank 0 the shared files) written under `staging/tag`, with their digests; a
    failure is returned, not raised, so that every rank reaches the same collectives."""
    root = staging / tag
    written: list[Path] = []
    try:
        if current_rank() == 0:
            written += _write_shared_files(state, root)
        sizes = {name: tensors["fp32"].numel for name, tensors in state.tensors.items()}
        for name in deal_by_size(sizes):
            written += _write_parameter(root / ZERO_DIR / name, state.tensors[name], state.step)
        return {relative_name(path, staging): file_digest(path) for path in written}, None
    except Exception as exc:
        return {}, exc


def _write_parameter(folder: Path, tensors: dict[str, LazyTensor], step: Any) -> list[Path]:
    """One parameter's universal files: its fp32 weights and moments whole, in the parameter's shape, and the step.
    One tensor is in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key in ("fp32", *ADAM_MOMENTS):
        path = folder / f"{key}.pt"
        torch.save({PARAM: tensors[key].load(torch.float32)}, path)
        written.append(path)
    written.append(folder / "step.pt")
    torch.save(_plain(step), written[-1])
    return written


def _write_shared_files(state: OptimizerState, root: Path) -> list[Path]:
    """Rank 0: the optimizer's shared settings and the model-states file that `load_universal` reads (scheduler,
    counters, shapes; ZeRO-1/2's without the module weights, which it does not read)."""
    (root / ZERO_DIR).mkdir(parents=True, exist_ok=True)  # other ranks may have made it for their parameters
    shared = {key: value for key, value in state.rank0_state.items() if key not in _SHARDED_KEYS}
    if state.zero_stage in (1, 2):
        groups = state.rank0_state["base_optimizer_state"]["param_groups"]
        model_states, name = {**state.model_states, "module": {}}, ZERO12_MODEL_STATES
    else:
        groups = state.rank0_state["optimizer_state_dict"]["param_groups"]
        # ZeRO-3's loader reads the step from the first group's state.
        shared["optimizer_state_dict"] = {"state": {0: {"step": _plain(state.step)}}, "param_groups": groups}
        model_states, name = dict(state.model_states), zero3_model_states(0)
    shared["param_groups"] = groups
    written = [root / ZERO_DIR / OPTIMIZER_STATE_FILE, root / name]
    torch.save(shared, written[0])
    torch.save(model_states, written[1])
    return written


def _plain(value: Any) -> Any:
    """A tensor copied out of its memory-mapped file (so the saved file holds only it), anything else as it is."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def _commit(
    staging: Path, target: Path, tag: str, state: OptimizerState, digests: dict[str, dict]
) -> BaseException | None:
    """Rank 0: the manifest of every rank's files, then the rename into place; the error, if any."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": int(_plain(state.step)),
        "world_size": current_world_size(),
        "converted_from_world_size": state.world_size,
        "deepspeed_tag": tag,
        "zero_stage": state.zero_stage,
        "files": dict(sorted(digests.items())),
    }
    try:
        commit_folder(staging, target, manifest)
    except OSError as exc:
        return exc
    return None
