"""The output_dir lock (training/run_lock.py): one holder at a time, a dead holder of this host taken over with a
line, a holder of another host never; and two real launches at once into one new folder."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, cpu_env

from model_training.hosts import this_host
from model_training.training.run_lock import RunLock, release_held


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): no process runs under it for now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(folder: Path, host: str, pid: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".run.lock"
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - 60, "slurm_job": "17"}))
    return path


def test_a_second_holder_is_refused_with_the_first_one_named(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path / "runs" / "a"), RunLock(tmp_path / "runs" / "a")
    assert first.take() is None
    holder = json.loads(first.path.read_text())
    assert (holder["host"], holder["pid"]) == (this_host(), os.getpid())
    refusal = second.take()
    assert refusal is not None and re.fullmatch(
        rf"key 'output_dir' is '\S+/runs/a', which a running run holds \(host {re.escape(this_host())}, pid "
        rf"{os.getpid()}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); wait for it to end, or choose another "
        r"output_dir", refusal), refusal
    first.release()
    assert not first.path.exists() and not (tmp_path / "runs").exists(), "an empty folder it made goes with it"


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    write_lock(tmp_path, this_host(), pid)
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert lock.take() is None
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert [r.getMessage() for r in caplog.records] == [
        f"output_dir {tmp_path}: took over the lock of a run that is gone (host {this_host()}, pid {pid}, started "
        f"{caplog.records[0].getMessage().split('started ')[1].split(',')[0]}, SLURM job 17)"]
    release_held()  # the exit path of preemption.py: the lock goes
    assert not lock.path.exists() and tmp_path.is_dir()


def test_a_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    path = write_lock(tmp_path, "node-that-crashed", dead_pid())
    before = path.read_text()
    refusal = RunLock(tmp_path).take()
    assert refusal is not None and f"; if that run is gone (a node that crashed), remove {path}" in refusal
    assert "host node-that-crashed" in refusal and "SLURM job 17" in refusal
    assert path.read_text() == before


@pytest.mark.slow
def test_two_launches_at_once_into_one_new_folder_train_one_run(tmp_path: Path) -> None:
    """Both pass the command's checks on an empty folder; exactly one takes the lock and trains, the other exits 2
    with one line naming the holder (or, if the first had finished before it got there, its earlier run)."""
    output_dir = tmp_path / "run"
    command = [sys.executable, str(REPO / "trainer_sft.py"), *TINY, f"output_dir={output_dir}", "max_steps=3",
               "save_steps=3", "logging_steps=1", "--no-deepspeed"]
    launches = [subprocess.Popen(command, cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in launches)
    (ok, _), (refused, stderr) = results
    assert (ok, refused) == (0, 2), results
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert re.search(r"which a running run holds \(host \S+, pid \d+, started|which holds an earlier run", errors[0])
    assert sorted(p.name for p in output_dir.iterdir()) == [
        ".run-files", "checkpoint-000003", "config.yaml", "latest", "metrics.jsonl", "training_curves.png"]
    assert [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_a_launch_takes_over_the_lock_of_a_dead_run_with_a_line(tmp_path: Path) -> None:
    """What a SIGKILLed run leaves: its lock, with a pid that runs no more on this host. The next launch (a requeue
    resuming it, here a new run) takes it over, says so, and removes it at its clean exit."""
    pid = dead_pid()
    lock = write_lock(tmp_path / "run", this_host(), pid)
    command = [sys.executable, str(REPO / "trainer_sft.py"), *TINY, f"output_dir={tmp_path / 'run'}", "max_steps=1",
               "save_steps=1", "--no-deepspeed"]
    result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"output_dir \S+/run: took over the lock of a run that is gone \(host {re.escape(this_host())}, "
                     rf"pid {pid}, started [\d: -]+ UTC, SLURM job 17\)", result.stderr), result.stderr[-3000:]
    assert not lock.exists() and (tmp_path / "run" / "checkpoint-000001").is_dir()
