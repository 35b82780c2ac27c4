"""One run at a time in an `output_dir`: a run holds the folder's lock file (layout.RUN_LOCK) for its lifetime.

Rank 0 of the job takes the lock before anything is written, and every rank learns the result (one broadcast): a
launch into a folder that another run holds is refused on every rank with one line naming the holder. Taking it is
creating the file with O_CREAT | O_EXCL, atomic on local filesystems and on NFS (v3 and later), Lustre and GPFS, so
two launches on two nodes that share the folder cannot both take it; the file holds the holder's host, pid, start
time and SLURM job. The lock goes when the run ends: at a clean exit, on a stop on a signal (preemption.py, its
immediate exits too), on an error. One left by a process that died without removing it (SIGKILL, a node's crash) is
stale: on the host it names, where that pid no longer runs (or runs a younger process), the next launch takes it
over and says so. A lock of another host is never taken over (no host can tell whether a process of another one
still runs): the refusal says which file to remove once its holder is known to be gone. A requeued SLURM job whose
first copy still runs is so refused like any other launch.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import psutil
import torch.distributed as dist

from model_training.config import ConfigError, TrainConfig
from model_training.hosts import dead_here, this_host
from model_training.layout import RUN_LOCK
from model_training.run_folder import refuse_to_mix_runs
from model_training.training.distributed import init_distributed

logger = logging.getLogger(__name__)
T = TypeVar("T")

_HELD: list[RunLock] = []
"""The locks this process holds, for `release_held` on an exit that skips `finally` blocks."""


class RunLock:
    """The lock file of one output_dir, as this process sees it."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.path = output_dir / RUN_LOCK
        self._created: list[Path] = []

    def take(self) -> str | None:
        """Take the lock (creating output_dir if needed); None when this process holds it now, else the refusal."""
        missing = [p for p in (self.output_dir, *self.output_dir.parents) if not p.exists()]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._created = missing  # removed again by `release` while empty: a refused launch leaves no folder behind
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is not None and _stale(holder) and self._take_over(holder):
                    continue
                self._remove_created_folders()
                return self._refusal(holder)
            with os.fdopen(fd, "w") as f:
                json.dump({"host": this_host(), "pid": os.getpid(), "started": time.time(),
                           "slurm_job": os.environ.get("SLURM_JOB_ID")}, f)
                f.flush()
                os.fsync(f.fileno())
            _HELD.append(self)
            return None

    def release(self) -> None:
        """Remove the lock, and the folders `take` created if the run left them empty."""
        if self in _HELD:
            _HELD.remove(self)
            self.path.unlink(missing_ok=True)
        self._remove_created_folders()

    def _take_over(self, holder: dict) -> bool:
        """Move the stale lock aside; False when what was moved was another launch's fresh lock (put back)."""
        aside = self.path.with_name(f"{RUN_LOCK}.stale-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another launch took it over first
            return True
        if _read(aside) != holder:  # another launch's fresh lock, taken between our read and our rename
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        logger.warning("output_dir %s: took over the lock of a run that is gone (%s)", self.output_dir,
                       _describe(holder))
        return True

    def _refusal(self, holder: dict | None) -> str:
        if holder is None:
            return (f"key 'output_dir' is '{self.output_dir}', whose lock {self.path} is being taken by another launch "
                    f"or is damaged; if no run writes there, remove {self.path}")
        where = "" if holder.get("host") == this_host() else (
            f"; if that run is gone (a node that crashed), remove {self.path}")
        return (f"key 'output_dir' is '{self.output_dir}', which a running run holds ({_describe(holder)}); wait for "
                f"it to end, or choose another output_dir{where}")

    def _remove_created_folders(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there, or another launch did
                break
        self._created = []


def holding_output_dir(cfg: TrainConfig, run: Callable[[], T]) -> T:
    """`run()` while this job holds `cfg.output_dir`'s lock (module docstring); call on every rank. ConfigError on
    every rank when another run holds it, or when an earlier run appeared there since the command's own checks."""
    info = init_distributed(cfg.local_rank, cfg.deepspeed)
    lock = RunLock(Path(cfg.output_dir)) if info.is_main else None
    refusal = [_take_and_check(lock, cfg) if lock is not None else None]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise ConfigError(refusal[0])
    try:
        return run()
    finally:
        if lock is not None:
            lock.release()


def release_held() -> None:
    """Remove the locks this process holds: an exit that skips `finally` blocks (preemption.py's) calls it."""
    for lock in list(_HELD):
        lock.release()


def _take_and_check(lock: RunLock, cfg: TrainConfig) -> str | None:
    refusal = lock.take()
    if refusal is not None:
        return refusal
    try:
        refuse_to_mix_runs(cfg)  # a run that started, and perhaps ended, after this command's checks
    except ConfigError as err:
        lock.release()
        return str(err)
    return None


def _read(path: Path) -> dict | None:
    """The lock's holder; None when the file is gone, empty (being written) or damaged."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "started"} <= holder.keys() else None


def _stale(holder: dict) -> bool:
    """Whether the holder is gone: on this host, its pid runs no more, or runs a process younger than the lock."""
    host, pid = str(holder["host"]), int(holder["pid"])
    if dead_here(host, pid):
        return True
    if host != this_host():
        return False
    try:
        return psutil.Process(pid).create_time() > float(holder["started"]) + 1.0
    except psutil.Error:
        return False


def _describe(holder: dict) -> str:
    started = datetime.fromtimestamp(float(holder["started"]), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder['host']}, pid {holder['pid']}, started {started}{job}"
