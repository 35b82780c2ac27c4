"""Work shared between processes through a folder: whoever creates a piece's claim file first does that piece.

The processes preparing the same data (the ranks of a job, on one node or on every node that shares the
filesystem, and a prepare command running beside them) meet in one work folder and need no process group: no
collective is open while they tokenize, so a long preparation never becomes a NCCL or gloo timeout.

Taking a piece is creating `<piece>.claim` with O_CREAT | O_EXCL, which is atomic on local filesystems and on NFS
(v3 and later), Lustre and GPFS. The claim holds its owner's host and pid, and its owner touches it every
`HEARTBEAT` seconds while it holds it. A claim whose owner is gone is *stale* and may be taken again: on the owner's
host, its pid no longer runs; anywhere, its mtime has not changed for `STALE_AFTER` seconds of the observer's own
clock (no clocks of two hosts are ever compared). A piece whose owner died is so done by another process. Two
processes that find the same claim stale at the same instant may both redo the piece: harmless, since a piece's
result is renamed into place whole and is the same whoever computes it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from model_training.hosts import dead_here, this_host

HEARTBEAT = 10.0
"""Seconds between touches of the claims a process holds."""
STALE_AFTER = 60.0
"""Seconds without a touch after which a claim of another host is taken for abandoned."""


class ClaimBoard:
    """The claims of one work folder, as one process sees them; `close()` stops its heartbeat."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.me = f"{this_host()} {os.getpid()}"
        self._held: set[str] = set()
        self._seen: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heart = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
        self._heart.start()

    def path(self, piece: str) -> Path:
        return self.folder / f"{piece}.claim"

    def claim(self, piece: str) -> bool:
        """Take `piece` if nobody holds it; True when this process now does."""
        try:
            fd = os.open(self.path(piece), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except (FileExistsError, FileNotFoundError):  # held; or the work folder is gone (the work is finished)
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.me + "\n")
        with self._lock:
            self._held.add(piece)
        return True

    def release(self, piece: str) -> None:
        """Give `piece` up (its result is in place, or its work failed and another may try)."""
        with self._lock:
            self._held.discard(piece)
        self.path(piece).unlink(missing_ok=True)

    def owner(self, piece: str) -> str | None:
        """"host pid" of the claim's owner; None when the piece is not claimed."""
        try:
            return self.path(piece).read_text().strip() or None
        except FileNotFoundError:
            return None

    def take_if_stale(self, piece: str) -> bool:
        """Remove `piece`'s claim when its owner is gone (module docstring), so that it can be claimed again; True when
        it was removed. Call it now and then while waiting: staleness is judged from what this process has seen."""
        path = self.path(piece)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        now = time.monotonic()
        first_seen = self._seen.setdefault(piece, (mtime, now))
        if first_seen[0] != mtime:
            self._seen[piece] = (mtime, now)
        owner = (self.owner(piece) or "").split()
        gone = len(owner) == 2 and dead_here(owner[0], int(owner[1]))
        if gone or now - self._seen[piece][1] > STALE_AFTER:
            path.unlink(missing_ok=True)
            self._seen.pop(piece, None)
            return True
        return False

    def close(self) -> None:
        """Stop the heartbeat and give up every claim still held."""
        self._stop.set()
        with self._lock:
            held = list(self._held)
        for piece in held:
            self.release(piece)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with self._lock:
                held = list(self._held)
            for piece in held:
                try:
                    os.utime(self.path(piece))
                except FileNotFoundError:  # released meanwhile, or taken for stale by another process
                    pass

