"""Whether a process named by its host and pid is gone: what a claim (data/claims.py) or a run's lock
(training/run_lock.py) left behind can be judged stale only on the host it names. And the signals that stop a job's
processes, which a training rank (training/preemption.py) and its data preparation (data/build.py) both answer."""

from __future__ import annotations

import os
import signal
import socket

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""A preemption (SIGTERM), a scheduler's warning before one (SIGUSR1, e.g. SLURM's --signal) and Ctrl-C."""


def this_host() -> str:
    return socket.gethostname()


def dead_here(host: str, pid: int) -> bool:
    """Whether `host` is this host and no process `pid` runs on it (a process of another host: never known)."""
    return host == this_host() and not pid_runs(pid)


def pid_runs(pid: int) -> bool:
    """Whether a process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
