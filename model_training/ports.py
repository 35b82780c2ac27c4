"""A free TCP port for a rendezvous, so that a run never trips on another job's port (29500, the launchers'
default, is often taken on a shared machine).

    python -m model_training.ports     # prints one, for scripts that pass --master_port to a launcher
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port no process listens on now (the OS's pick); a process binding it a moment later gets it."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    print(free_port())
