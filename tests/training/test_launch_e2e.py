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
from helpers import (
    DEEPSPEED,
    FAULT_WORKER,
    REPO,
    TINY,
    TRAINER,
    check_ok,
    cpu_env,
    free_port,
    run_deepspeed,
    step_losses,
)

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


def test_a_one_node_launch_meets_on_a_free_port_while_29500_is_held(tmp_path: Path) -> None:
    """The README's `deepspeed --num_gpus 2 trainer_sft.py ...`, no --master_port, while another process holds the
    launcher's default port: rank 0 takes a free port and says so once; the run trains."""
    with held(LAUNCHERS_DEFAULT_PORT):
        result = run([DEEPSPEED, "--num_gpus", "2", str(TRAINER), *TINY, f"output_dir={tmp_path}", "max_steps=2",
                      "logging_steps=1", "save_strategy=no"])
    check_ok(result)
    assert sorted(step_losses(tmp_path)) == [1, 2]
    moved = [line for line in result.stdout.splitlines() if "is in use by another process" in line]
    assert len(moved) == 1 and re.fullmatch(r"port 29500 is in use by another process: the ranks of this one-node run "
                                            r"meet on port \d+ instead", moved[0]), moved


def test_a_port_in_use_where_the_ranks_cannot_move_is_one_line(tmp_path: Path) -> None:
    """Rank 0 as srun starts it (RANK, WORLD_SIZE, MASTER_ADDR/MASTER_PORT from the job script): the other ranks,
    maybe on other nodes, expect that port, so the rank says which port, and what to do, in one line."""
    port = free_port()
    env = cpu_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with held(port):
        result = subprocess.run([sys.executable, str(TRAINER), *TINY, f"output_dir={tmp_path / 'run'}", "max_steps=1"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: rank 0: port {port} on 127.0.0.1 is in use by another process; choose a free one: "
                      "--master_port=N for deepspeed or torchrun, MASTER_PORT=N for srun"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_process_alone_trains_while_the_launchers_default_port_is_taken(tmp_path: Path) -> None:
    """`python trainer_sft.py` with no launcher, from a shell that exported nothing: its one-process group rendezvous
    on a free port, not on 29500; it sets setup_env.sh's defaults itself and says so in one line; the console shows
    each validation and a summary."""
    unset = ("MASTER_PORT", "DS_ACCELERATOR", "WANDB_MODE", "WANDB_API_KEY", "TOKENIZERS_PARALLELISM",
             "TORCH_EXTENSIONS_DIR")
    env = {key: value for key, value in cpu_env(HOME=str(tmp_path)).items() if key not in unset}
    run = tmp_path / "run"
    with held(LAUNCHERS_DEFAULT_PORT):
        result = subprocess.run([sys.executable, str(TRAINER), *TINY, f"output_dir={run}", "max_steps=2",
                                 "logging_steps=1", "eval_steps=2", "save_steps=2"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    check_ok(result)
    assert sorted(step_losses(run)) == [1, 2]
    assert not re.search(r"\b29500\b", result.stdout)
    lines = result.stdout.replace("\r", "\n").splitlines()
    assert [line for line in lines if line.startswith("environment:")] == [
        "environment: TOKENIZERS_PARALLELISM=false WANDB_MODE=offline DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="
        f"{Path(sys.prefix) / 'torch_extensions'} (scripts/setup_env.sh's defaults; export a value to choose another)"]
    assert len([line for line in lines if re.fullmatch(
        r"step 2 validation oasst_export: loss \d\.\d+, accuracy \d+\.\d%", line)]) == 1
    assert any(re.fullmatch(r"done: 2 steps in [\d.]+ s, [\d,]+ tokens/s while training; run folder " + str(run), line)
               for line in lines)
    assert f"next, export it: python export_model.py {run} --output_folder {run}-export" in lines


def test_a_rank_that_dies_is_named_by_the_rank_that_stays(tmp_path: Path) -> None:
    """Rank 1 killed (SIGKILL: no word of its own) right after checkpoint 2: rank 0 says which rank exited, and
    where to look, in one line without a traceback."""
    result = run_deepspeed([*TINY, f"output_dir={tmp_path}", "max_steps=6", "save_steps=2", "logging_steps=1",
                            "eval_steps=2"], script=FAULT_WORKER, FAULT_KILL_AFTER_SAVE_STEP="2")
    assert result.returncode != 0
    named = [line for line in result.stdout.splitlines() if re.search(r"rank 0: rank 1 \(pid \d+\) exited first", line)]
    assert len(named) == 1, result.stdout[-4000:]
    assert "its own error is above (none: the OS killed it" in named[0]
    assert "Traceback" not in result.stdout
    # The evaluation before it, on rank 0's console only.
    assert result.stdout.replace("\r", "\n").count("step 2 validation oasst_export: loss") == 1
