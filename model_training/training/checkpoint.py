"""Atomic, verifiable training checkpoints of the training engine, DeepSpeed's or the plain PyTorch one of
torch_engine.py, which writes its files through the same calls (the layout: model_training/layout.py): the write
side (saving, committing, rotating) and the load into an engine, with the RNG states and the seeding a resume needs.
Finding, verifying and reading a committed checkpoint without an engine is model_training/checkpoints/read.py's,
which the export shares.

A save writes everything into the staging folder, makes every rank agree that its writes succeeded, writes
the manifest, and commits with one atomic rename. A folder is *committed* when it holds ``manifest.json``
and is not a staging or deleting folder; everything else is ignored. DeepSpeed's own ``latest`` file is
never written (``save_latest=False``): DeepSpeed writes it before all ranks have finished their files.

All ranks must see ``output_dir`` at the same path on a shared filesystem: rank 0 commits the folder the
other ranks wrote into. DeepSpeed's default (synchronous) checkpoint engine is assumed: a decoupled engine
would still be writing when ``engine.save_checkpoint`` returns.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_training.checkpoints.ranks import current_rank, current_world_size, gather_from_ranks
from model_training.checkpoints.read import (
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_bytes,
    committed_checkpoints,
    file_digest,
    holds_rank_shards,
    is_transient,
    pointer_target,
    read_manifest,
    verify_checkpoint,
)
from model_training.console import ranks, size_text
from model_training.folders import discard_folder, fsync_folder, replace_folder
from model_training.layout import (
    DELETING_PREFIX,
    MANIFEST,
    POINTER,
    RNG_DIR,
    STAGING_PREFIX,
    TRAINER_STATE,
    UNIVERSAL_DIR,
    checkpoint_name,
)

logger = logging.getLogger(__name__)


def deepspeed_tag(step: int) -> str:
    """The tag DeepSpeed's files are saved under inside a checkpoint folder (DeepSpeed's own convention)."""
    return f"global_step{step}"


# --- saving -----------------------------------------------------------------------------------------------


def save_checkpoint(
    engine: Any,
    output_dir: Path,
    step: int,
    trainer_state: dict,
    save_total_limit: int | None,
    write_extra: Callable[[Path], None] | None = None,
    trained_only: bool = False,
    more_engines: dict[str, Any] | None = None,
) -> Path:
    """Save a checkpoint of ``engine`` at ``step`` and return its committed folder. Call on every rank.

    ``trained_only``: leave out the frozen parameters (a LoRA run's base), which are not ours to keep.
    ``more_engines``: other engines committed with it, each in the subfolder its key names (PPO's value model).

    ``trainer_state`` (JSON-serialisable) and ``write_extra(staging_dir)`` are used on rank 0 only, so
    ``write_extra`` must not run collectives (no ZeRO-3 parameter gathering). If any rank fails to write,
    every rank raises ``CheckpointError`` naming the failing ranks and their errors; the previous
    checkpoints and the ``latest`` pointer are then untouched. After the commit, at most
    ``save_total_limit`` checkpoints are kept (``None`` keeps all).

    Each phase ends in a gather of every rank's error, so that all ranks go on or raise together.
    """
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"save_total_limit must be None or >= 1, got {save_total_limit}")
    target = _SaveTarget(Path(output_dir), step)
    untouched = "; earlier checkpoints and the latest pointer are untouched"

    # The gather is the barrier that keeps other ranks from writing into the staging folder before it exists.
    error = _prepare_staging(target) if current_rank() == 0 else None
    reports = gather_from_ranks((describe_error(error), None))
    _raise_if_any_failed(reports, target, "preparing the staging folder" + untouched, error)

    digests, error = _write_files(engine, target, trainer_state, write_extra, trained_only, more_engines or {})
    reports = gather_from_ranks((describe_error(error), digests))
    if current_rank() == 0 and any(e is not None for e, _ in reports):
        # Every rank is past its writes (all reached the gather): the folder can go, freeing the space.
        shutil.rmtree(target.staging, ignore_errors=True)
    _raise_if_any_failed(reports, target, "writing" + untouched, error)

    error = _commit_on_rank_0(engine, target, reports, save_total_limit) if current_rank() == 0 else None
    _raise_if_any_failed(gather_from_ranks((describe_error(error), None)), target, "committing", error)
    return target.final


@dataclass(frozen=True)
class _SaveTarget:
    """Where the checkpoint of ``step`` is staged and committed, under ``output_dir``."""

    output_dir: Path
    step: int

    @property
    def name(self) -> str:
        return checkpoint_name(self.step)

    @property
    def staging(self) -> Path:
        return self.output_dir / (STAGING_PREFIX + self.name)

    @property
    def final(self) -> Path:
        return self.output_dir / self.name

    def failure(self, how: str) -> str:
        return f"Saving checkpoint of step {self.step} to {self.final} failed {how}"


def _raise_if_any_failed(
    reports: list[tuple[str | None, Any]], target: _SaveTarget, what: str, cause: BaseException | None
) -> None:
    """Raise, on every rank alike, naming each rank whose report (error, _) holds an error; ``cause`` is this
    rank's own."""
    failed = [f"rank {r}: {error}" for r, (error, _) in enumerate(reports) if error is not None]
    if failed:
        full = any(sign in error for error in failed for sign in DISK_FULL_SIGNS)
        raise CheckpointError(target.failure(f"while {what} ({'; '.join(failed)})"
                                             + (_disk_full_note(target.output_dir) if full else ""))) from cause


DISK_FULL_SIGNS = ("[Errno 28]", "No space left on device", "unexpected pos")
"""How a full disk shows in a failed write: the OS's ENOSPC, or torch's serializer ("failed writing file ...:
unexpected pos 868864 vs 868752"), which turns it into a RuntimeError of its own."""


def _disk_full_note(output_dir: Path) -> str:
    """What a save that filled the disk needs: the space free now (the failed save's files removed) and the size of
    the newest committed checkpoint, which a new one of the same run matches."""
    free = shutil.disk_usage(output_dir).free
    committed = committed_checkpoints(output_dir) if output_dir.is_dir() else []
    needed = (f"needs about {size_text(checkpoint_bytes(committed[-1]))}, as {committed[-1].name} did"
              if committed else "needs more than that")
    return (f"; the disk of {output_dir} is full: {size_text(free)} free once the partial checkpoint was removed, "
            f"and a checkpoint of this run {needed}: free space there, or keep fewer checkpoints (save_total_limit)")


def _prepare_staging(target: _SaveTarget) -> BaseException | None:
    """Rank 0: an empty staging folder, the leftovers of crashed saves removed; the error, if any."""
    try:
        target.output_dir.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(target.output_dir)
        target.staging.mkdir()
    except Exception as exc:
        return exc
    return None


def _write_files(
    engine: Any,
    target: _SaveTarget,
    trainer_state: dict,
    write_extra: Callable[[Path], None] | None,
    trained_only: bool,
    more_engines: dict[str, Any],
) -> tuple[dict[str, dict], BaseException | None]:
    """This rank's files in the staging folder, and the digest of each: the engine's state, the RNG states and,
    on rank 0, the trainer state and the caller's extras.

    A failed write is returned, not raised, so that every rank runs the same collectives. Each rank hashes the
    files it wrote itself: it sees its own writes even where a network filesystem caches directory listings.
    """
    rank, staging = current_rank(), target.staging
    written: list[Path] = []
    error: BaseException | None = None
    for folder, each in _by_folder(staging, engine, more_engines):
        try:
            # After a failed write the other engines still save: every rank must run the same collectives.
            files, failed = _save_engine(each, folder, deepspeed_tag(target.step), trained_only and each is engine)
        except Exception as exc:
            # Not a failed write (those are contained) but the engine failing midway: the other ranks may wait in
            # one of DeepSpeed's collectives, which this rank cannot rejoin. Stop now; the launcher stops the others.
            raise CheckpointError(
                target.failure(f"inside {type(each).__name__} on rank {rank}: {describe_error(exc)}")
            ) from exc
        written += files
        error = error or failed
    if error is not None:
        return {}, error
    try:
        written.append(_save_rng_state(staging, rank))
        if rank == 0:
            (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
            if write_extra is not None:
                write_extra(staging)
        return {relative_name(path, staging): file_digest(path) for path in written}, None
    except Exception as exc:
        return {}, exc


def _commit_on_rank_0(
    engine: Any, target: _SaveTarget, reports: list[tuple[str | None, dict]], save_total_limit: int | None
) -> BaseException | None:
    """Rank 0: the manifest of every rank's digests, the commit, the ``latest`` pointer, the rotation; the
    error, if any, of the steps that decide whether the checkpoint exists."""
    digests: dict[str, dict] = {}
    for _, rank_digests in reports:
        digests.update(rank_digests)
    try:
        commit_folder(target.staging, target.final, _build_manifest(engine, target.step, target.staging, digests))
        _write_pointer(target.output_dir, target.name)
    except Exception as exc:
        return exc
    if save_total_limit is not None:
        try:
            rotate_checkpoints(target.output_dir, save_total_limit)
        except OSError as exc:
            # The new checkpoint is committed; a folder that could not be removed costs only space.
            logger.warning("checkpoint rotation in %s failed: %s", target.output_dir, exc)
    return None


class _ContainedWrites:
    """While entered, DeepSpeed's file writes on this rank record their error instead of raising it.

    An exception escaping ``engine.save_checkpoint`` on one rank would skip the collectives DeepSpeed still
    runs on the others (its closing barrier): they would wait there until that rank's exit broke the process
    group, and none of them would learn why. DeepSpeed writes its state files through
    ``checkpoint_engine.save`` and, on rank 0, copies its recovery scripts in ``_copy_recovery_script``;
    containing both keeps this rank on the same collective path as the others, so that the failure can be
    shared afterwards. After the first failed write (the disk is likely full) the rest are not attempted.
    """

    def __init__(self, engine: Any) -> None:
        self.written: list[Path] = []
        self.errors: list[BaseException] = []
        self._engine = engine
        self._save = engine.checkpoint_engine.save
        self._copy = engine._copy_recovery_script

    def __enter__(self) -> _ContainedWrites:
        self._engine.checkpoint_engine.save = self._contained_save
        self._engine._copy_recovery_script = self._contained_copy
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._engine.checkpoint_engine.save = self._save
        self._engine._copy_recovery_script = self._copy

    def _contained_save(self, state_dict: Any, path: str) -> None:
        if self._attempt(self._save, state_dict, path):
            self.written.append(Path(path))

    def _contained_copy(self, save_path: str) -> None:
        self._attempt(self._copy, save_path)

    def _attempt(self, write: Callable[..., None], *args: Any) -> bool:
        if self.errors:
            return False
        try:
            write(*args)
        except Exception as exc:
            self.errors.append(exc)
            return False
        return True


def _save_engine(
    engine: Any, staging: Path, tag: str, trained_only: bool
) -> tuple[list[Path], BaseException | None]:
    """Write DeepSpeed's state into ``staging/tag``; return the files this rank wrote and its first failed
    write, if any."""
    with _ContainedWrites(engine) as contained:
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False, exclude_frozen_parameters=trained_only)
    return contained.written, (contained.errors[0] if contained.errors else None)


def _by_folder(root: Path, engine: Any, more_engines: dict[str, Any]) -> list[tuple[Path, Any]]:
    """Each engine of a checkpoint with the folder its state lives in: the main one in `root`, the others in their
    subfolders."""
    return [(root, engine), *((root / name, other) for name, other in more_engines.items())]


def _save_rng_state(staging: Path, rank: int) -> Path:
    """Write this rank's RNG states (data order, dropout) to a per-rank file."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        # As plain ints, so that the file loads with weights_only=True.
        "numpy": [kind, key.tolist(), pos, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    path = _rng_path(staging, rank)
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)
    return path


def _restore_rng_state(ckpt_dir: Path, rank: int) -> None:
    state = torch.load(_rng_path(ckpt_dir, rank), weights_only=True)
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_path(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / RNG_DIR / f"rank-{rank:05d}.pt"


def _build_manifest(engine: Any, step: int, staging: Path, digests: dict[str, dict]) -> dict:
    """Manifest of every file in ``staging``. Runs on rank 0, which wrote every file that no rank reported
    (the caller's extras, DeepSpeed's recovery scripts) and so can hash those itself."""
    files = dict(digests)
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        relative = relative_name(path, staging)
        if relative not in files:
            files[relative] = file_digest(path)
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": current_world_size(),
        "deepspeed_tag": deepspeed_tag(step),
        "zero_stage": engine.zero_optimization_stage(),
        "files": dict(sorted(files.items())),
    }


def commit_folder(staging: Path, final: Path, manifest: dict) -> None:
    """Write the manifest into ``staging`` and rename it to ``final``: the checkpoint appears whole or not.
    A run resumed from an earlier step saves a step again: the old folder goes aside under a name the
    resolver never loads (it falls back to an older checkpoint for that instant)."""
    _write_durably(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    replace_folder(staging, final, aside=final.parent / (DELETING_PREFIX + final.name), durable=True)


def _write_pointer(output_dir: Path, name: str) -> None:
    """Point ``output_dir/latest`` at ``name``; readers see the old or the new pointer, never a torn one."""
    temporary = output_dir / f".{POINTER}.tmp"
    _write_durably(temporary, name + "\n")
    os.replace(temporary, output_dir / POINTER)
    fsync_folder(output_dir)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _clear_leftovers(output_dir: Path) -> None:
    """Remove staging and deleting folders that a crashed save or rotation left behind."""
    for path in output_dir.iterdir():
        if path.is_dir() and is_transient(path):
            shutil.rmtree(path)


# --- rotating ---------------------------------------------------------------------------------------------


def rotate_checkpoints(output_dir: Path, save_total_limit: int) -> list[Path]:
    """Delete the oldest committed checkpoints so that ``save_total_limit`` remain; return the deleted ones.

    The checkpoint ``latest`` points to is always kept (after a resume from an earlier step it need not be
    the highest), so the only committed checkpoint is never deleted. Uncommitted folders and folders not
    named ``checkpoint-<step>`` are left alone.
    """
    if save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1, got {save_total_limit}")
    output_dir = Path(output_dir)
    committed = committed_checkpoints(output_dir)
    keep = set(committed[-save_total_limit:])
    pointed = pointer_target(output_dir)
    deleted = []
    for path in committed:
        if path not in keep and path != pointed:
            discard_folder(path, aside=path.parent / (DELETING_PREFIX + path.name))
            deleted.append(path)
    if deleted:
        fsync_folder(output_dir)
    return deleted



# --- loading ----------------------------------------------------------------------------------------------


def load_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    trained_only: bool = False,
    more_engines: dict[str, Any] | None = None,
    rng_seed: int = 0,
) -> dict:
    """Load model, optimizer and lr scheduler into ``engine`` and the RNG states from ``ckpt_dir``; return the trainer
    state. Call on every rank.

    On the number of ranks that saved it, each rank restores its own RNG states. On another number, per-rank ZeRO
    state is read from the checkpoint's universal conversion (training/reshard.py must have made it; the engines
    built with DeepSpeed's ``"checkpoint": {"load_universal": true}``), and each rank's RNG streams are derived anew
    from ``rng_seed``, the step and its rank (`seed_rank`), so that they do not depend on the old number of ranks.
    ``trained_only``: the checkpoint holds only the trained weights (LoRA); the rest stays as built.
    ``more_engines``: the other engines `save_checkpoint` committed with it, by subfolder."""
    ckpt_dir = Path(ckpt_dir)
    manifest = verify_checkpoint(ckpt_dir)
    trainer_state = json.loads((ckpt_dir / TRAINER_STATE).read_text())
    saved, current = manifest["world_size"], current_world_size()
    universal = saved != current and holds_rank_shards(manifest)
    for folder, each in _by_folder(ckpt_dir, engine, more_engines or {}):
        source = folder / UNIVERSAL_DIR if universal else folder
        if universal and not _universal_load_configured(each, source):
            raise CheckpointError(
                f"Checkpoint {ckpt_dir} was saved by {ranks(saved)} and this run has {current}: its ZeRO-"
                f"{manifest.get('zero_stage')} optimizer state is cut per rank, so it loads only through its "
                f"universal conversion with load_universal on (the trainer makes both when it resumes)"
            )
        load_path, _ = each.load_checkpoint(
            str(source),
            tag=manifest["deepspeed_tag"],
            load_module_strict=not (trained_only and each is engine),
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load tag {manifest['deepspeed_tag']!r} from {source}")
        if universal:
            _unshare_step_counts(each.basic_optimizer)
        # DeepSpeed's CPU Adam keeps part of its state outside the checkpoint (see there).
        replay_cpu_adam_steps(each.basic_optimizer)
    # Last, so that nothing the engine does while loading draws from the restored generators.
    if saved == current:
        _restore_rng_state(ckpt_dir, current_rank())
    else:
        seed_rank(rng_seed, manifest["step"], current_rank())
    return trainer_state


def _universal_load_configured(engine: Any, source: Path) -> bool:
    """Whether `engine` loads DeepSpeed's universal checkpoints and `source` holds a committed one."""
    return bool(getattr(engine, "load_universal_checkpoint", lambda: False)()) and read_manifest(source) is not None


def _unshare_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter's optimizer state its own step tensor. DeepSpeed's ZeRO-3 universal load hands one loaded
    tensor to every sub-group, and PyTorch's Adam increments its step in place: with several sub-groups, each update
    would count the shared step once per sub-group."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int, step: int, rank: int) -> None:
    """Seed this rank's generators from (seed, step, rank) alone: the streams of a resume on another number of ranks,
    the same for rank r whatever the number that saved the checkpoint."""
    seed_everything(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1))


def replay_cpu_adam_steps(optimizer: torch.optim.Optimizer) -> None:
    """Bring DeepSpeed's C++ CPU Adam to the restored step the way an uninterrupted run got there.

    DeepSpeedCPUAdam (the offloaded optimizer), and FusedAdam on the CPU accelerator, keep beta1^t and beta2^t
    for the bias corrections inside the C++ op, outside the optimizer state that a checkpoint holds. A running
    op multiplies them by beta once per step in float32; one that first runs at step t, as after a resume,
    starts from pow(beta, t). The rounding the product gathers makes the two differ in the last bit (beta2 0.95:
    0.3405615 against 0.34056154 at step 21), and where that bit survives into the float32 1/sqrt(1 - beta2^t),
    an update changes: resumed at step 20, the tiny run's updates 34, 41, 59 and 63 differed. Running steps
    1..t through the op (lr 0, a one-element scratch tensor, every group in the optimizer's own order) rebuilds
    the products bit for bit, at one small call per step and group (about a second for 100k steps).
    """
    # Imported here: only this replay needs DeepSpeed, so importing the module (the saver and its tests) does not
    # start it.
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    param, grad, exp_avg, exp_avg_sq = (torch.zeros(1) for _ in range(4))
    if isinstance(optimizer, DeepSpeedCPUAdam):
        def run_step(step: int, group: dict) -> None:
            optimizer.ds_opt_adam.adam_update(
                optimizer.opt_id, step, 0.0, *group["betas"], group["eps"], 0.0, group["bias_correction"],
                param, grad, exp_avg, exp_avg_sq,
            )
    elif isinstance(optimizer, FusedAdam) and get_accelerator().device_name() == "cpu":
        def run_step(step: int, group: dict) -> None:
            optimizer.multi_tensor_adam(
                1, optimizer._dummy_overflow_buf, [[grad], [param], [exp_avg], [exp_avg_sq]], 0.0,
                *group["betas"], group["eps"], step, optimizer.adam_w_mode, int(group["bias_correction"]), 0.0,
            )
    else:  # torch's optimizers and the CUDA kernels compute the corrections from the step alone
        return
    steps = max((int(state["step"]) for state in optimizer.state.values() if "step" in state), default=0)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            run_step(step, group)


# --- error reports and file names -------------------------------------------------------------------------


def describe_error(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def relative_name(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()
