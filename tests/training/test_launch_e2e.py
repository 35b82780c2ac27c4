"""Launching while another job holds a port: the real commands, with a real socket on the port."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DEEPSPEED, REPO, TINY, TRAINER, check_ok, cpu_env, free_port, step_losses

pytestmark = pytest.mark.slow

LAUNCHERS_DEFAULT_PORT = 29500


@contextlib.contextmanager
def held(port: int) -> Iterator[socket.socket | None]:
    """A listening socket on `port`, or None when another process already listens there: held either way."""
    sock = socket.socket()
    try:
        sock.bind(("", port))
        sock.listen()
    except OSError:
        sock.close()
        yield None
        return
    with sock:
        yield sock


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)


def test_a_port_in_use_is_one_line_that_names_the_rank_the_port_and_the_fix(tmp_path: Path) -> None:
    port = free_port()
    with held(port):
        result = run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(TRAINER), *TINY,
                      f"output_dir={tmp_path / 'run'}", "max_steps=1"])
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert lines == [f"error: rank 0: port {port} on 127.0.0.1 is in use by another process; pass --master_port=N "
                     "(a free port) to the launcher, or leave it out of scripts/quickstart.sh, which picks a free one"]
    assert "Traceback" not in result.stdout and "EADDRINUSE" not in result.stdout
    assert not (tmp_path / "run").exists()


def test_a_process_alone_trains_while_the_launchers_default_port_is_taken(tmp_path: Path) -> None:
    """`python trainer_sft.py` with no launcher: its one-process group rendezvous on a free port, not on 29500."""
    env = {key: value for key, value in cpu_env().items() if key != "MASTER_PORT"}
    with held(LAUNCHERS_DEFAULT_PORT):
        result = subprocess.run([sys.executable, str(TRAINER), *TINY, f"output_dir={tmp_path}", "max_steps=2",
                                 "logging_steps=1", "save_strategy=no"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=900)
    check_ok(result)
    assert sorted(step_losses(tmp_path)) == [1, 2]
    assert not re.search(r"\b29500\b", result.stdout)
