"""Atomic, verifiable training checkpoints for DeepSpeed runs.

On-disk layout of a run folder (``output_dir``)::

    output_dir/
        latest                      pointer: the name of the newest committed checkpoint, updated last
        checkpoint-000080/          one committed checkpoint per save
            manifest.json           written last, before the commit: files, sizes, sha256, step, world size
            trainer_state.json      the caller's counters and data position (rank 0)
            rng/rank-00000.pt       python, numpy, torch (and CUDA) RNG states, one file per rank
            global_step80/...       DeepSpeed engine state: model, optimizer shards, lr scheduler
            ...                     files the caller's ``write_extra`` wrote (merged config, tokenizer)
        .staging-checkpoint-000100/ a save in progress or a crashed one; cleared by the next save
        .deleting-checkpoint-000040/ a checkpoint being removed; never loaded

A save writes everything into the staging folder, makes every rank agree that its writes succeeded, writes
the manifest, and commits with one atomic rename. A folder is *committed* when it holds ``manifest.json``
and is not a staging or deleting folder; everything else is ignored. DeepSpeed's own ``latest`` file is
never written (``save_latest=False``): DeepSpeed writes it before all ranks have finished their files.

All ranks must see ``output_dir`` at the same path on a shared filesystem: rank 0 commits the folder the
other ranks wrote into. DeepSpeed's default (synchronous) checkpoint engine is assumed: a decoupled engine
would still be writing when ``engine.save_checkpoint`` returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

POINTER_NAME = "latest"
MANIFEST_NAME = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
FORMAT_VERSION = 1

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d{6,})")
_STAGING_PREFIX = ".staging-"
_DELETING_PREFIX = ".deleting-"
# Our folders in transit; only these are ever cleared without being a committed checkpoint.
_TRANSIENT_RE = re.compile(r"\.(staging|deleting)-checkpoint-\d{6,}")
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or loaded."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint of ``step``; zero-padded so that names sort like steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"checkpoint-{step:06d}"


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
) -> Path:
    """Save a checkpoint of ``engine`` at ``step`` and return its committed folder. Call on every rank.

    ``trained_only``: leave out the frozen parameters (a LoRA run's base), which are not ours to keep.

    ``trainer_state`` (JSON-serialisable) and ``write_extra(staging_dir)`` are used on rank 0 only, so
    ``write_extra`` must not run collectives (no ZeRO-3 parameter gathering). If any rank fails to write,
    every rank raises ``CheckpointError`` naming the failing ranks and their errors; the previous
    checkpoints and the ``latest`` pointer are then untouched. After the commit, at most
    ``save_total_limit`` checkpoints are kept (``None`` keeps all).
    """
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"save_total_limit must be None or >= 1, got {save_total_limit}")
    output_dir = Path(output_dir)
    rank = _rank()
    name = checkpoint_name(step)
    staging = output_dir / (_STAGING_PREFIX + name)
    final = output_dir / name

    def fail_if_any(reports: list[tuple[str | None, Any]], what: str, cause: BaseException | None) -> None:
        failed = [f"rank {r}: {error}" for r, (error, _) in enumerate(reports) if error is not None]
        if failed:
            raise CheckpointError(
                f"Saving checkpoint of step {step} to {final} failed while {what} ({'; '.join(failed)})"
            ) from cause

    untouched = "; earlier checkpoints and the latest pointer are untouched"

    # 1. Rank 0 prepares an empty staging folder; the gather is the barrier that keeps other ranks from
    #    writing into it before it exists.
    error = None
    if rank == 0:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            _clear_leftovers(output_dir)
            staging.mkdir()
        except Exception as exc:
            error = exc
    fail_if_any(_gather((_describe(error), None)), "preparing the staging folder" + untouched, error)

    # 2. Every rank writes its files. Failed writes are kept, not raised, so that every rank runs the same
    #    collectives; each rank then hashes the files it wrote itself (it sees its own writes even where a
    #    network filesystem caches directory listings) and the gather shares errors and digests.
    try:
        written, error = _save_engine(engine, staging, deepspeed_tag(step), trained_only)
    except Exception as exc:
        # Not a failed write (those are contained) but DeepSpeed failing midway: the other ranks may wait in
        # one of its collectives, which this rank cannot rejoin. Stop now; the launcher stops the others.
        raise CheckpointError(
            f"Saving checkpoint of step {step} to {final} failed inside DeepSpeed on rank {rank}: "
            f"{_describe(exc)}"
        ) from exc
    digests: dict[str, dict] = {}
    if error is None:
        try:
            written.append(_save_rng_state(staging, rank))
            if rank == 0:
                state_text = json.dumps(trainer_state, indent=2, sort_keys=True)
                (staging / TRAINER_STATE_NAME).write_text(state_text + "\n")
                if write_extra is not None:
                    write_extra(staging)
            digests = {_relative(path, staging): _digest(path) for path in written}
        except Exception as exc:
            error = exc
    reports = _gather((_describe(error), digests))
    if rank == 0 and any(e is not None for e, _ in reports):
        # Every rank is past its writes (all reached the gather): the folder can go, freeing the space.
        shutil.rmtree(staging, ignore_errors=True)
    fail_if_any(reports, "writing" + untouched, error)

    # 3. Rank 0 writes the manifest, commits, moves the pointer and rotates; the gather tells every rank
    #    whether that worked, so that all of them return or raise together.
    error = None
    if rank == 0:
        try:
            for _, rank_digests in reports:
                digests.update(rank_digests)
            _commit(staging, final, _build_manifest(engine, step, staging, digests))
            _write_pointer(output_dir, name)
        except Exception as exc:
            error = exc
        if error is None and save_total_limit is not None:
            try:
                rotate_checkpoints(output_dir, save_total_limit)
            except OSError as exc:
                # The new checkpoint is committed; a folder that could not be removed costs only space.
                logger.warning("checkpoint rotation in %s failed: %s", output_dir, exc)
    fail_if_any(_gather((_describe(error), None)), "committing", error)
    return final


@contextmanager
def _contained_writes(engine: Any, written: list[Path], errors: list[BaseException]) -> Iterator[None]:
    """Make DeepSpeed's file writes on this rank record their error instead of raising it.

    An exception escaping ``engine.save_checkpoint`` on one rank would skip the collectives DeepSpeed still
    runs on the others (its closing barrier): they would wait there until that rank's exit broke the process
    group, and none of them would learn why. DeepSpeed writes its state files through
    ``checkpoint_engine.save`` and, on rank 0, copies its recovery scripts in ``_copy_recovery_script``;
    containing both keeps this rank on the same collective path as the others, so that the failure can be
    shared afterwards.
    """

    def save(state_dict: Any, path: str) -> None:
        if errors:  # one write failed (the disk is likely full): do not attempt the rest
            return
        try:
            original_save(state_dict, path)
            written.append(Path(path))
        except Exception as exc:
            errors.append(exc)

    def copy_recovery_script(save_path: str) -> None:
        if errors:
            return
        try:
            original_copy(save_path)
        except Exception as exc:
            errors.append(exc)

    original_save = engine.checkpoint_engine.save
    original_copy = engine._copy_recovery_script
    engine.checkpoint_engine.save = save
    engine._copy_recovery_script = copy_recovery_script
    try:
        yield
    finally:
        engine.checkpoint_engine.save = original_save
        engine._copy_recovery_script = original_copy


def _save_engine(
    engine: Any, staging: Path, tag: str, trained_only: bool
) -> tuple[list[Path], BaseException | None]:
    """Write DeepSpeed's state into ``staging/tag``; return the files this rank wrote and its first failed
    write, if any."""
    written: list[Path] = []
    errors: list[BaseException] = []
    with _contained_writes(engine, written, errors):
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False, exclude_frozen_parameters=trained_only)
    return written, (errors[0] if errors else None)


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
    return ckpt_dir / "rng" / f"rank-{rank:05d}.pt"


def _build_manifest(engine: Any, step: int, staging: Path, digests: dict[str, dict]) -> dict:
    """Manifest of every file in ``staging``. Runs on rank 0, which wrote every file that no rank reported
    (the caller's extras, DeepSpeed's recovery scripts) and so can hash those itself."""
    files = dict(digests)
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        relative = _relative(path, staging)
        if relative not in files:
            files[relative] = _digest(path)
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": _world_size(),
        "deepspeed_tag": deepspeed_tag(step),
        "zero_stage": engine.zero_optimization_stage(),
        "files": dict(sorted(files.items())),
    }


def _digest(path: Path) -> dict:
    """Size and sha256 of ``path``; the fsync makes the bytes durable before the manifest vouches for them."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _commit(staging: Path, final: Path, manifest: dict) -> None:
    """Write the manifest into ``staging`` and rename it to ``final``: the checkpoint appears whole or not."""
    _write_durably(staging / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    for directory in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(directory)
    _fsync_dir(staging)
    replaced = None
    if final.exists():
        # A run resumed from an earlier step saves this step again. rename cannot replace a non-empty folder:
        # move the old one aside (the resolver falls back to an older checkpoint for that instant).
        replaced = final.parent / (_DELETING_PREFIX + final.name)
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def _write_pointer(output_dir: Path, name: str) -> None:
    """Point ``output_dir/latest`` at ``name``; readers see the old or the new pointer, never a torn one."""
    temporary = output_dir / f".{POINTER_NAME}.tmp"
    _write_durably(temporary, name + "\n")
    os.replace(temporary, output_dir / POINTER_NAME)
    _fsync_dir(output_dir)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clear_leftovers(output_dir: Path) -> None:
    """Remove staging and deleting folders that a crashed save or rotation left behind."""
    for path in output_dir.iterdir():
        if path.is_dir() and _is_transient(path):
            shutil.rmtree(path)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder; the rename first takes it out of view at once, so that a crash during
    the slow delete cannot leave a half-deleted folder that still looks committed."""
    doomed = path.parent / (_DELETING_PREFIX + path.name)
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


# --- finding and rotating ---------------------------------------------------------------------------------


def rotate_checkpoints(output_dir: Path, save_total_limit: int) -> list[Path]:
    """Delete the oldest committed checkpoints so that ``save_total_limit`` remain; return the deleted ones.

    The checkpoint ``latest`` points to is always kept (after a resume from an earlier step it need not be
    the highest), so the only committed checkpoint is never deleted. Uncommitted folders and folders not
    named ``checkpoint-<step>`` are left alone.
    """
    if save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1, got {save_total_limit}")
    output_dir = Path(output_dir)
    committed = _committed_checkpoints(output_dir)
    keep = set(committed[-save_total_limit:])
    pointed = _pointer_target(output_dir)
    deleted = []
    for path in committed:
        if path not in keep and path != pointed:
            _discard(path)
            deleted.append(path)
    if deleted:
        _fsync_dir(output_dir)
    return deleted


def resolve_checkpoint(spec: str | Path, output_dir: Path) -> Path:
    """Find the committed checkpoint folder that ``spec`` names.

    ``"latest"`` or a run folder: the checkpoint its ``latest`` pointer names if that is committed and
    verifies, else the committed checkpoint with the highest step that verifies. A checkpoint folder: that
    folder, which must be committed and verify. A relative path that does not exist is tried under
    ``output_dir``.
    """
    output_dir = Path(output_dir)
    if str(spec) == POINTER_NAME:
        return _latest_in(output_dir)
    path = Path(spec)
    if not path.exists() and not path.is_absolute():
        path = output_dir / path
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint or run folder at {spec!r} (also looked in {output_dir})")
    if _is_checkpoint_folder(path):
        verify_checkpoint(path)
        return path
    return _latest_in(path)


def run_folder(path: Path) -> Path:
    """The run folder that ``path`` (a run folder or one of its checkpoint folders) belongs to."""
    path = Path(path)
    return path.parent if _is_checkpoint_folder(path) else path


def _is_checkpoint_folder(path: Path) -> bool:
    """One checkpoint folder, committed or not, rather than a run folder."""
    return (path / MANIFEST_NAME).exists() or _CHECKPOINT_RE.fullmatch(path.name) is not None or _is_transient(path)


def verify_checkpoint(ckpt_dir: Path, check_hashes: bool = False) -> dict:
    """Check that ``ckpt_dir`` is committed and every file of its manifest exists with the recorded size
    (and sha256 with ``check_hashes``, which reads the whole checkpoint); return the manifest."""
    ckpt_dir = Path(ckpt_dir)
    manifest = _read_manifest(ckpt_dir)
    if manifest is None:
        raise CheckpointError(
            f"{ckpt_dir} is not a committed checkpoint: it has no readable {MANIFEST_NAME} or is a staging "
            "folder (the save did not finish)"
        )
    for relative, expected in manifest["files"].items():
        path = ckpt_dir / relative
        if not path.is_file():
            raise CheckpointError(f"Checkpoint {ckpt_dir} is damaged: {relative} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"Checkpoint {ckpt_dir} is damaged: {relative} has {size} bytes, the manifest says "
                f"{expected['size']}"
            )
        if check_hashes and _digest(path)["sha256"] != expected["sha256"]:
            raise CheckpointError(f"Checkpoint {ckpt_dir} is damaged: {relative} does not match its sha256")
    return manifest


def _latest_in(run_dir: Path) -> Path:
    committed = _committed_checkpoints(run_dir) if run_dir.is_dir() else []
    pointed = _pointer_target(run_dir)
    candidates = ([pointed] if pointed in committed else []) + [p for p in committed[::-1] if p != pointed]
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
    raise CheckpointError(
        f"No usable committed checkpoint in {run_dir}: searched its {POINTER_NAME} pointer and folders named "
        f"checkpoint-<step> holding {MANIFEST_NAME} (found {len(committed)} committed, none verified)"
    )


def _committed_checkpoints(run_dir: Path) -> list[Path]:
    """Committed ``checkpoint-<step>`` folders of ``run_dir``, oldest step first."""
    found = []
    for path in run_dir.iterdir():
        match = _CHECKPOINT_RE.fullmatch(path.name)
        if match and path.is_dir() and _read_manifest(path) is not None:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _pointer_target(run_dir: Path) -> Path | None:
    try:
        name = (run_dir / POINTER_NAME).read_text().strip()
    except OSError:
        return None
    # Only a checkpoint name is followed: the pointer can never lead outside the run folder.
    return run_dir / name if _CHECKPOINT_RE.fullmatch(name) else None


def _read_manifest(ckpt_dir: Path) -> dict | None:
    """The manifest of a committed checkpoint; None for anything else."""
    if _is_transient(ckpt_dir):
        return None
    try:
        manifest = json.loads((ckpt_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    required = {"format_version", "step", "world_size", "deepspeed_tag", "files"}
    if not isinstance(manifest, dict) or not required <= manifest.keys():
        return None
    return manifest


def _is_transient(path: Path) -> bool:
    return _TRANSIENT_RE.fullmatch(path.name) is not None


# --- loading ----------------------------------------------------------------------------------------------


def read_trainer_state(ckpt_dir: Path) -> dict:
    """The trainer state of a committed checkpoint that this run can load: the manifest is verified and the
    world size must match (without touching an engine, so a caller can check its own state first)."""
    ckpt_dir = Path(ckpt_dir)
    manifest = verify_checkpoint(ckpt_dir)
    saved, current = manifest["world_size"], _world_size()
    if saved != current:
        raise CheckpointError(
            f"Checkpoint {ckpt_dir} was saved by {saved} ranks and this run has {current}. Its optimizer "
            f"state (ZeRO stage {manifest.get('zero_stage')}) is sharded per rank, so resuming on a "
            f"different number of ranks is not supported for this checkpoint: resume with {saved} ranks."
        )
    return json.loads((ckpt_dir / TRAINER_STATE_NAME).read_text())


def load_checkpoint(engine: Any, ckpt_dir: Path, trained_only: bool = False) -> dict:
    """Load model, optimizer and lr scheduler into ``engine`` and this rank's RNG states from ``ckpt_dir``;
    return the trainer state. Call on every rank, with the same number of ranks that saved the checkpoint.
    ``trained_only``: the checkpoint holds only the trained weights (LoRA); the rest stays as built."""
    ckpt_dir = Path(ckpt_dir)
    trainer_state = read_trainer_state(ckpt_dir)
    tag = _read_manifest(ckpt_dir)["deepspeed_tag"]
    load_path, _ = engine.load_checkpoint(
        str(ckpt_dir),
        tag=tag,
        load_module_strict=not trained_only,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load tag {tag!r} from {ckpt_dir}")
    # Last, so that nothing the engine does while loading draws from the restored generators.
    _restore_rng_state(ckpt_dir, _rank())
    return trainer_state


# --- distributed helpers ----------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order. Doubles as a barrier: no rank returns before all have called."""
    if _world_size() == 1:
        return [value]
    values: list[Any] = [None] * _world_size()
    dist.all_gather_object(values, value)
    return values


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _relative(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()
