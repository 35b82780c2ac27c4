"""A stop on a signal: a preemption or a time limit ends the run with a checkpoint at the step it reached.

SIGTERM, SIGUSR1 or SIGINT reaching a rank (sent to it, or forwarded by `srun`, torchrun or DeepSpeed's launcher), or
the exit of a launcher process above it, asks for a stop (`StopRequest`). The loop asks `StopRequest.agreed()` once
per optimizer step (one all-reduce of one number over a gloo group: a host round trip, no device sync, nothing per
micro-batch); from the first step where any rank was asked, every rank saves a checkpoint through the normal atomic,
hashed commit and the run exits with `EXIT_STOPPED`: run the same command again (`--resume_from_checkpoint auto`).

Two things end a stop without its checkpoint, leaving the last committed one as the newest:
- a second signal, more than `REPEAT_WINDOW_S` after the first (the first one's copies, sent by a scheduler to every
  process and forwarded by the launchers, arrive within milliseconds of each other): the rank exits at once with
  128 + the signal's number, as if the signal had killed it;
- the checkpoint not committed `grace_period` seconds after the first signal: the rank exits with
  `EXIT_STOP_TIMED_OUT`, before the scheduler's SIGKILL would come unannounced.
A staging folder such an exit leaves is never loaded, and the next save clears it.
A signal that comes once another rank of this node has exited (its launcher stops the others) is no stop: no
collective, so no checkpoint, can finish without that rank. The rank says which one exited (`describe_exited`) and
exits at once with status 1; a collective that fails for that reason says the same (run.run_or_exit).

Signals are read by a thread of their own (Python's wakeup file descriptor): the main thread may sit in a collective
or a checkpoint write for minutes, and a second signal or the grace period must still act then. The same thread
watches the launcher processes above the rank (DeepSpeed's runner and its per-node launcher, torchrun's agent): the
`deepspeed` runner dies of a SIGTERM without passing it on, and its ranks would otherwise train on as orphans.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import NoReturn, TypeVar

import psutil
import torch
import torch.distributed as dist

from model_training.hosts import STOP_SIGNALS
from model_training.training.run_lock import release_held

logger = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_STOPPED = 75
"""Exit status of a run that a signal stopped after its checkpoint was committed (EX_TEMPFAIL: run it again)."""
EXIT_STOP_TIMED_OUT = 124
"""Exit status of a rank whose stop did not commit its checkpoint within the grace period."""
REPEAT_WINDOW_S = 2.0
"""Signals this close to the first are copies of it (scheduler, srun, launcher), not a second request."""
WATCH_INTERVAL_S = 1.0
"""How often the launcher processes and the grace period are checked."""
_WAKE_UP = 0
"""The byte `close` writes into the signal pipe to end the thread's wait (no signal has number 0)."""
LAUNCHERS = ("deepspeed", "deepspeed.launcher.launch", "deepspeed.launcher.runner", "torchrun", "torch.distributed.run",
             "torch.distributed.launch")
"""Scripts and modules of the launchers whose exit stops the ranks below them."""


class Stopped(Exception):
    """Raised on every rank once a stop's checkpoint is committed; the command exits with EXIT_STOPPED."""


class StopRequest:
    """Whether a stop was asked for on this rank, and from when; `start()` installs the signal handling."""

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.reason: str | None = None
        self.asked_at: float | None = None
        """time.monotonic() of the first request on this rank: a signal, a launcher's exit, or another rank's."""
        self._signalled_at: float | None = None
        self._saved = threading.Event()
        self._closed = threading.Event()
        self._group: dist.ProcessGroup | None = None
        self._read_fd = self._write_fd = -1
        self._previous: dict[int, object] = {}
        self._launchers: list[tuple[psutil.Process, str]] = []
        self._thread: threading.Thread | None = None

    @property
    def asked(self) -> bool:
        return self.asked_at is not None

    def start(self) -> None:
        """Install the handlers (the main thread only can) and start the watching thread."""
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous = {signum: signal.signal(signum, _leave_to_the_watcher) for signum in STOP_SIGNALS}
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        _HANDLED_IN_THIS_PROCESS.set()
        self._launchers = launcher_processes()
        self._thread = threading.Thread(target=self._watch, name="stop-request", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Put the previous handlers back and stop the thread (a process that goes on after training: tests)."""
        if self._thread is None:
            return
        signal.set_wakeup_fd(-1)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        _HANDLED_IN_THIS_PROCESS.clear()
        self._closed.set()
        os.write(self._write_fd, bytes([_WAKE_UP]))  # the thread leaves its wait now, not at its next tick
        self._thread.join()
        os.close(self._read_fd)
        os.close(self._write_fd)
        self._thread = None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop. Call on every rank at the same point: one all-reduce of one number."""
        note_sibling_ranks()
        asked = self.asked
        if dist.is_initialized() and dist.get_world_size() > 1:
            if self._group is None:  # a CPU group: the flag never waits for, or syncs with, the device's work
                self._group = dist.new_group(backend="gloo")
            flag = torch.tensor([float(asked)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            if flag.item() and not asked:
                self.ask("another rank was asked to stop")  # from now on, this rank's grace period runs too
            asked = bool(flag.item())
        return asked

    def stopped(self, step: int, checkpoint: Path | None) -> NoReturn:
        """End the run after optimizer step `step`, its checkpoint (None: nothing new to save) committed on every
        rank: says so and raises `Stopped`."""
        self._saved.set()  # the grace period no longer applies
        saved = f"{checkpoint.name} committed" if checkpoint is not None else "no new checkpoint"
        logger.warning("stopped (%s) after optimizer step %d: %s, %.1f s after the request; exit status %d: run the "
                       "same command again to continue (--resume_from_checkpoint auto)", self.reason, step, saved,
                       self.seconds_since_asked(), EXIT_STOPPED)
        raise Stopped(f"stopped after optimizer step {step}")

    def seconds_since_asked(self) -> float:
        return 0.0 if self.asked_at is None else time.monotonic() - self.asked_at

    def ask(self, reason: str) -> None:
        """Ask for a stop (the watching thread does, on a signal or a launcher's exit)."""
        if self.asked_at is not None:
            return
        self.asked_at, self.reason = time.monotonic(), reason
        logger.warning("%s: stopping at the end of this optimizer step, after a checkpoint (within %.0f s)",
                       reason, self.grace_period)

    def _watch(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self._read_fd], [], [], WATCH_INTERVAL_S)
            if ready:
                for signum in os.read(self._read_fd, 64):
                    if signum != _WAKE_UP:
                        self._on_signal(signum)
            if not self.asked:
                self._check_launchers()
            elif not self._saved.is_set() and self.seconds_since_asked() > self.grace_period:
                logger.error("the checkpoint of the stop (%s) was not committed within stop_grace_period (%.0f s): "
                             "exiting without it; the last committed checkpoint stays the newest",
                             self.reason, self.grace_period)
                _exit_now(EXIT_STOP_TIMED_OUT)

    def _on_signal(self, signum: int) -> None:
        # Only a signal this rank received before counts: another rank's request (other nodes may be signalled later)
        # or a launcher's exit do not make this rank's own signal a second one.
        name, now = signal.Signals(signum).name, time.monotonic()
        if self._signalled_at is None:
            self._signalled_at = now
            gone = exited_ranks()
            if gone:  # the launcher stops the others after one rank exited: no collective, so no checkpoint, can finish
                logger.error("%s", describe_exited(gone))
                _exit_now(1)
            self.ask(f"received {name}")
        elif now - self._signalled_at > REPEAT_WINDOW_S and not self._saved.is_set():
            logger.error("received %s again, %.1f s after the first signal: exiting now, without the stop's "
                         "checkpoint; the last committed checkpoint stays the newest", name, now - self._signalled_at)
            _exit_now(128 + signum)

    def _check_launchers(self) -> None:
        for process, command in self._launchers:
            if not _alive(process):
                self.ask(f"the launcher process {process.pid} ({command}) exited")
                return


_HANDLED_IN_THIS_PROCESS = threading.Event()
"""Set while a StopRequest handles the signals of this process (not of the processes it forks)."""


def run_stoppable(grace_period: float, run: Callable[[StopRequest], T]) -> T:
    """`run(stop)` with a `StopRequest` listening from the very start (a signal during the minutes of startup counts
    too) and closed after, however `run` ends."""
    stop = StopRequest(grace_period)
    stop.start()
    try:
        return run(stop)
    finally:
        stop.close()


def _default_handling_in_forked_child() -> None:
    """A process forked while a stop is handled (a data worker) has no watching thread: it would ignore the signals
    and write into its parent's pipe. It dies of them again, as it would have."""
    if _HANDLED_IN_THIS_PROCESS.is_set():
        _HANDLED_IN_THIS_PROCESS.clear()
        signal.set_wakeup_fd(-1)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)


os.register_at_fork(after_in_child=_default_handling_in_forked_child)


def _leave_to_the_watcher(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing, since the watching thread acts on the signal (through the wakeup file
    descriptor, written by the C-level handler this installs) even while the main thread is busy in C code."""


def _exit_now(status: int) -> None:
    """Exit the process at once: the main thread may be blocked in a collective that will never finish."""
    release_held()  # the run's lock: its process is gone, a requeue on another node must not find it held
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(status)


def launcher_processes() -> list[tuple[psutil.Process, str]]:
    """The launcher processes above this one, each with its program: its parent and each parent above while it runs
    one of LAUNCHERS (under `deepspeed`: the per-node launcher and the runner; under torchrun: its agent; under srun
    or alone: none)."""
    chain = []
    try:
        process = psutil.Process().parent()
        while process is not None:
            # The program is among the first words: `python -u -m deepspeed.launcher.launch`, `python .../deepspeed`.
            program = next((word for word in process.cmdline()[:4] if os.path.basename(word) in LAUNCHERS), None)
            if program is None:
                break
            chain.append((process, os.path.basename(program)))
            process = process.parent()
    except psutil.Error:  # a parent that exited meanwhile or that this user may not inspect ends the chain
        pass
    return chain


_SIBLINGS: dict[int, str] | None = None
"""pid -> rank of the other ranks this rank's launcher started (on this node), to name one that exits; None until
`note_sibling_ranks`."""


def _sibling_ranks(launcher: psutil.Process) -> dict[int, str]:
    found = {}
    try:
        for child in launcher.children():
            rank = child.environ().get("RANK") if child.pid != os.getpid() else None
            if rank is not None:
                found[child.pid] = rank
    except psutil.Error:  # a child that exited meanwhile, or one this user may not inspect
        pass
    return found


def note_sibling_ranks() -> None:
    """Learn the other ranks this rank's launcher started, to name one that exits later. Call it once every rank of
    the node runs: after the process group formed (start_run), and at the first stop vote."""
    global _SIBLINGS
    if _SIBLINGS is None:
        launchers = launcher_processes()
        _SIBLINGS = _sibling_ranks(launchers[0][0]) if launchers else {}


def exited_ranks() -> list[str]:
    """The ranks of this node that have exited while this one runs: "rank 1 (pid 4639)"."""
    return [f"rank {rank} (pid {pid})" for pid, rank in sorted((_SIBLINGS or {}).items(), key=lambda item: int(item[1]))
            if not _alive_pid(pid)]


def describe_exited(gone: list[str]) -> str:
    """The one line that says which rank died before this one, and where to look for why."""
    return (f"rank {os.environ.get('RANK', '0')}: {', '.join(gone)} exited first; its own error is above (none: the OS "
            "killed it, out of memory for one: check `dmesg` or the job's memory limit); this rank stops too, without "
            "a new checkpoint: resume from the last committed one (--resume_from_checkpoint)")


def _alive_pid(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        # A launcher killed while its own parent does not reap it stays a zombie: it is gone all the same.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
