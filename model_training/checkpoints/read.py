"""Committed training checkpoints, read: finding one, verifying it against its manifest, and reading its trainer state
and manifest (the layout: model_training/layout.py; the weights themselves: zero.py).

A folder is *committed* when it holds ``manifest.json`` (every file with its size and hash) and is not a staging or
deleting folder; everything else is ignored. training/checkpoint.py writes checkpoints in this form; the manifest's
format (FORMAT_VERSION, `file_digest`) is defined here, beside the verification that reads it, and written there and
by training/reshard.py. The readers: the export (export/), a resume (training/resume.py, reshard.py, torch_engine.py),
a training run given as the starting model (training/start.py) and the trainers' command line (cli.py). Nothing here
imports training/ or export/, so that each side can read a checkpoint without the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from model_training.checkpoints.ranks import current_rank, current_world_size, gather_from_ranks
from model_training.layout import CHECKPOINT_RE, MANIFEST, POINTER, TRAINER_STATE, TRANSIENT_RE, ZERO_OPTIM_SHARD_RE

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""1 recorded sha256 per file; 2 records xxh3_128, which reads at disk speed (both still verify)."""

_HASH_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or loaded."""


class NewestCheckpointUnusable(CheckpointError):
    """The newest checkpoint of a run does not verify, and no fallback to an older one was allowed."""


# --- the manifest's hashes --------------------------------------------------------------------------------


def file_digest(path: Path) -> dict:
    """Size and hash of ``path``; the fsync makes the bytes durable before the manifest vouches for them."""
    with open(path, "rb") as f:
        digest = _hash_file(f, "xxh3_128")
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "xxh3_128": digest}


# xxh3_128 (format 2) finds corruption and reads at about a GB/s per core, several times sha256's speed; it is
# no defence against someone forging a checkpoint, which no hash stored beside the data would be either.
_HASHES: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def _hash_file(f: Any, kind: str) -> str:
    hasher = _HASHES[kind]()
    while chunk := f.read(_HASH_CHUNK):
        hasher.update(chunk)
    return hasher.hexdigest()


def _hash_mismatch(ckpt_dir: Path, relative: str, expected: dict) -> str | None:
    """A message when the file's content does not match the hash its manifest recorded, else None."""
    kind = next(k for k in _HASHES if k in expected)
    with open(ckpt_dir / relative, "rb") as f:
        if _hash_file(f, kind) == expected[kind]:
            return None
    return f"Checkpoint {ckpt_dir} is damaged: {relative} does not match its {kind} (changed after the save)"


# --- finding and verifying --------------------------------------------------------------------------------


def resolve_checkpoint(
    spec: str | Path, output_dir: Path, allow_older: bool = True, check_hashes: bool = False, threads: int = 1
) -> Path:
    """Find the committed checkpoint folder that ``spec`` names.

    ``"latest"`` or a run folder: the checkpoint its ``latest`` pointer names, else the one with the highest
    step, if it verifies. When that one does not (a damaged or half-written folder), ``allow_older`` falls back
    to the next one that does, with a warning for each skipped; otherwise it is an error. A checkpoint folder:
    that folder, which must be committed and verify. A relative path that does not exist is tried under
    ``output_dir``. ``check_hashes``: a checkpoint verifies only when every file matches its manifest's hash
    (verify_checkpoint on ``threads`` threads), so that ``allow_older`` passes over a damaged file too.
    """
    output_dir = Path(output_dir)
    if str(spec) == POINTER:
        return _latest_in(output_dir, allow_older, check_hashes, threads)
    path = Path(spec)
    if not path.exists() and not path.is_absolute():
        path = output_dir / path
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint or run folder at {spec!r} (also looked in {output_dir})")
    if _is_checkpoint_folder(path):
        verify_checkpoint(path, check_hashes, threads)
        return path
    return _latest_in(path, allow_older, check_hashes, threads)


def run_folder(path: Path) -> Path:
    """The run folder that ``path`` (a run folder or one of its checkpoint folders) belongs to."""
    path = Path(path)
    return path.parent if _is_checkpoint_folder(path) else path


def _is_checkpoint_folder(path: Path) -> bool:
    """One checkpoint folder, committed or not, rather than a run folder."""
    return (path / MANIFEST).exists() or CHECKPOINT_RE.fullmatch(path.name) is not None or is_transient(path)


def verify_checkpoint(ckpt_dir: Path, check_hashes: bool = False, threads: int = 1) -> dict:
    """Check that ``ckpt_dir`` is committed and every file of its manifest exists with the recorded size
    (and content hash with ``check_hashes``, on ``threads`` threads: it reads the whole checkpoint); return
    the manifest."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if manifest is None:
        raise CheckpointError(
            f"{ckpt_dir} is not a committed checkpoint: it has no readable {MANIFEST} or is a staging "
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
    if check_hashes:
        _raise_first(_mismatches(ckpt_dir, manifest, list(manifest["files"]), threads))
    return manifest


def verify_hashes_on_ranks(ckpt_dir: Path) -> float:
    """Check every file of a committed checkpoint against its manifest's hash, the files dealt out over the
    ranks so that each hashes a share (largest files first, to the least loaded rank), all in parallel.
    Raises CheckpointError naming every file that does not match, on every rank. Call on every rank; returns
    the seconds it took this rank."""
    start = time.perf_counter()
    manifest = verify_checkpoint(ckpt_dir)
    mine = deal_by_size({relative: entry["size"] for relative, entry in manifest["files"].items()})
    reports = gather_from_ranks(_mismatches(Path(ckpt_dir), manifest, mine, threads=4))
    _raise_first([message for report in reports for message in report])
    return time.perf_counter() - start


def deal_by_size(sizes: dict[str, int]) -> list[str]:
    """This rank's share of work items (name -> size) dealt out over the ranks: largest first, each to the least
    loaded rank, ties by name, so that every rank computes the same deal."""
    load = [0] * current_world_size()
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = load.index(min(load))
        load[owner] += sizes[name]
        if owner == current_rank():
            mine.append(name)
    return mine


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """The bytes of every file a committed checkpoint's manifest lists."""
    manifest = read_manifest(Path(ckpt_dir)) or {"files": {}}
    return sum(entry["size"] for entry in manifest["files"].values())


def _mismatches(ckpt_dir: Path, manifest: dict, relatives: list[str], threads: int) -> list[str]:
    # hashlib and xxhash release the GIL on large buffers: threads hash files side by side.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = pool.map(lambda relative: _hash_mismatch(ckpt_dir, relative, manifest["files"][relative]), relatives)
        return [message for message in found if message is not None]


def _raise_first(messages: list[str]) -> None:
    if messages:
        more = f" (and {len(messages) - 1} more files)" if len(messages) > 1 else ""
        raise CheckpointError(messages[0] + more)


def _latest_in(run_dir: Path, allow_older: bool, check_hashes: bool = False, threads: int = 1) -> Path:
    folders = _checkpoint_folders(run_dir) if run_dir.is_dir() else []
    pointed = pointer_target(run_dir)
    candidates = ([pointed] if pointed in folders else []) + [p for p in folders[::-1] if p != pointed]
    for path in candidates:
        try:
            verify_checkpoint(path, check_hashes, threads)
            return path
        except CheckpointError as exc:
            if not allow_older:
                newest = f"the newest checkpoint of {run_dir}, {path.name}"
                raise NewestCheckpointUnusable(f"{newest}, is unusable: {exc}") from None
            logger.warning("skipping checkpoint %s: %s", path.name, exc)
    committed = len(committed_checkpoints(run_dir)) if run_dir.is_dir() else 0
    raise CheckpointError(
        f"No usable committed checkpoint in {run_dir}: searched its {POINTER} pointer and folders named "
        f"checkpoint-<step> holding {MANIFEST} (found {committed} committed, none verified)"
    )


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder of ``run_dir``, committed or not, oldest step first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def committed_checkpoints(run_dir: Path) -> list[Path]:
    """Committed ``checkpoint-<step>`` folders of ``run_dir``, oldest step first."""
    return [path for path in _checkpoint_folders(run_dir) if read_manifest(path) is not None]


def pointer_target(run_dir: Path) -> Path | None:
    try:
        name = (run_dir / POINTER).read_text().strip()
    except OSError:
        return None
    # Only a checkpoint name is followed: the pointer can never lead outside the run folder.
    return run_dir / name if CHECKPOINT_RE.fullmatch(name) else None


def read_manifest(ckpt_dir: Path) -> dict | None:
    """The manifest of a committed checkpoint; None for anything else."""
    if is_transient(ckpt_dir):
        return None
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    required = {"format_version", "step", "world_size", "deepspeed_tag", "files"}
    if not isinstance(manifest, dict) or not required <= manifest.keys():
        return None
    return manifest


def is_transient(path: Path) -> bool:
    return TRANSIENT_RE.fullmatch(path.name) is not None


# --- reading ----------------------------------------------------------------------------------------------


def read_trainer_state(ckpt_dir: Path) -> dict:
    """The trainer state of a committed checkpoint, its manifest verified (without touching an engine, so a caller can
    check its own state first)."""
    ckpt_dir = Path(ckpt_dir)
    verify_checkpoint(ckpt_dir)
    return json.loads((ckpt_dir / TRAINER_STATE).read_text())


def holds_rank_shards(manifest: dict) -> bool:
    """Whether a checkpoint's engine state is cut per rank (DeepSpeed's ZeRO optimizer shards), so that another
    number of ranks loads it only through its universal conversion (training/reshard.py). The plain PyTorch engine's
    state, the same on every rank, loads on any number."""
    return any(ZERO_OPTIM_SHARD_RE.fullmatch(Path(name).name) for name in manifest["files"])

