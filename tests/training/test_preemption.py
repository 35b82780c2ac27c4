"""A stop on a signal (model_training/training/preemption.py): a flag any signal sets, agreed at the next optimizer
step, a checkpoint through the normal commit and a documented exit status; a second signal or the grace period ends it
without committing anything; a signalled launcher takes its ranks down. Through the real launcher on CPU ranks, and a
process alone for what needs no launcher."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    DEEPSPEED,
    FAULT_WORKER,
    REPO,
    RESUME_RUN,
    TINY,
    TRAINER,
    check_ok,
    cpu_env,
    free_port,
    run_deepspeed,
    run_torchrun,
)
from test_train_e2e import assert_continues_exactly

from model_training.checkpoints.read import resolve_checkpoint
from model_training.training.preemption import EXIT_STOP_TIMED_OUT, EXIT_STOPPED, REPEAT_WINDOW_S, StopRequest
from model_training.training.step_plan import DataPosition, SourceDraw, StepPlan

STOP_WITHIN_S = 60
"""How long a stopped run may take to be gone in these tests (a stop of the tiny model takes about 3 s here)."""


def last_logged_step(run: Path) -> int:
    """The last step metrics.jsonl holds (0 before the first); a line being written is not counted."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return max(steps, default=0)


def start_in_its_own_session(args: list[str], log: Path, script: Path = TRAINER, ranks: int = 2,
                             **env: str) -> subprocess.Popen:
    """`deepspeed` on `script`, as a job's processes are: one process group (runner, launcher, ranks)."""
    command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *args]
    return subprocess.Popen(command, cwd=REPO, env=cpu_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def wait_until_gone(job: subprocess.Popen, timeout: float = STOP_WITHIN_S) -> float:
    """Seconds until no process of the job's process group is left (the runner reaped: a zombie is still a member)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        job.poll()
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            return time.monotonic() - start
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    raise AssertionError(f"processes of the job still ran {timeout} s after the signal")


def ranks_of(runner: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(runner.pid).children(recursive=True)
            if any(word.startswith("--local_rank") for word in p.cmdline())]


# --- the flag, in this process and a process alone ----------------------------------------------------------------


def test_a_signal_asks_for_a_stop_which_one_process_agrees_on_alone() -> None:
    previous = signal.getsignal(signal.SIGINT)
    stop = StopRequest(grace_period=60)
    stop.start()
    try:
        assert not stop.asked and not stop.agreed()
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the flag only
        deadline = time.monotonic() + 10
        while not stop.asked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.reason == "received SIGINT" and stop.agreed()
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is previous


ALONE = """
import os, signal, sys, time
from model_training.training.preemption import StopRequest
stop = StopRequest(grace_period=float(sys.argv[1]))
stop.start()
for delay in map(float, sys.argv[2:]):
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGTERM)
time.sleep(60)  # a save that never ends
"""


@pytest.mark.parametrize(
    ("grace", "delays", "status", "message"),
    [
        # The copies of one stop (the scheduler's, srun's, the launcher's) arrive together: one request.
        ("3", ["0", "0.05"], EXIT_STOP_TIMED_OUT, "was not committed within stop_grace_period (3 s)"),
        ("60", ["0", str(REPEAT_WINDOW_S + 0.5)], 128 + signal.SIGTERM, "received SIGTERM again"),
    ],
    ids=["grace-period", "second-signal"],
)
def test_a_stop_that_does_not_commit_in_time_or_a_second_signal_exits_at_once(
    grace: str, delays: list[str], status: int, message: str
) -> None:
    """The main thread sleeps as if stuck in a save: the stop's own thread ends the process."""
    result = subprocess.run([sys.executable, "-c", ALONE, grace, *delays], cwd=REPO, env=cpu_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stderr
    assert message in result.stderr


# --- through the launcher ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_every_process_saves_where_it_landed_and_the_same_command_continues_exactly(
    tmp_path: Path, run_80: Path
) -> None:
    """A preemption: SIGTERM to the runner, the launcher and both ranks at a random step. Nothing is lost (the
    checkpoint is of the step the signal landed in, or the next), and the requeued command, unchanged, continues as
    the uninterrupted run did, bit for bit."""
    run = tmp_path / "run"
    args = [*RESUME_RUN, f"output_dir={run}", "resume_from_checkpoint=auto"]
    at = random.Random().randint(22, 58)  # not on a checkpoint's step: those are multiples of 20 anyway
    job = start_in_its_own_session(args, tmp_path / "stopped.log")
    wait_for(lambda: last_logged_step(run) >= at, job, f"step {at}")
    ranks = ranks_of(job)
    sent = time.monotonic()
    os.killpg(job.pid, signal.SIGTERM)
    landed = last_logged_step(run)  # every step up to it was done when the signal came
    _, left = psutil.wait_procs(ranks, timeout=STOP_WITHIN_S)
    seconds = time.monotonic() - sent
    assert not left, f"ranks still running {STOP_WITHIN_S} s after the signal"
    wait_until_gone(job)  # and the launchers
    log = (tmp_path / "stopped.log").read_text()
    stopped = resolve_checkpoint("latest", run)
    saved = int(stopped.name.split("-")[1])
    assert landed <= saved <= landed + 2, (landed, saved, log[-3000:])
    assert last_logged_step(run) == saved  # no step after the checkpoint
    assert f"stopped (received SIGTERM) after optimizer step {saved}: {stopped.name} committed" in log
    print(f"SIGTERM to every process at step {landed}: checkpoint of step {saved}, the ranks gone {seconds:.2f} s "
          "after the signal")

    resumed = check_ok(run_deepspeed(args))
    assert f"resumed from {stopped} at optimizer step {saved}" in resumed.stdout
    assert_continues_exactly(run, run_80, after_step=saved)


@pytest.mark.slow
def test_a_signalled_runner_takes_its_ranks_down_with_a_checkpoint(zero2_run: Path, tmp_path: Path) -> None:
    """SIGTERM to the `deepspeed` runner alone, which dies of it without passing it on: the rank notices its launcher
    is gone, saves and exits with EXIT_STOPPED (the per-node launcher reports it), instead of training on as an orphan
    to the last step.

    The run (one launch, for the suite's time) is also a resume with three changes, said on one line: checkpoint 4 of
    the 2-rank zero2_run (16-sample steps, 8 in its schedule) on 1 rank (the universal conversion), in 8-sample steps,
    for 400 steps. Its checkpoint says where the data went on: 8 samples a step from sample 64 of epoch 0."""
    source = Path(shutil.copytree(zero2_run / "checkpoint-000004", tmp_path / "source" / "checkpoint-000004"))
    run = tmp_path / "run"
    job = start_in_its_own_session([*TINY, "max_steps=400", "save_steps=1000", "logging_steps=1", f"output_dir={run}",
                                    f"resume_from_checkpoint={source}"], tmp_path / "job.log", ranks=1)
    wait_for(lambda: last_logged_step(run) >= 7, job, "step 7")
    os.kill(job.pid, signal.SIGTERM)
    wait_until_gone(job)
    log = (tmp_path / "job.log").read_text()
    stopped = resolve_checkpoint("latest", run)
    saved = int(stopped.name.split("-")[1])
    assert 7 <= saved < 400 and last_logged_step(run) == saved, log[-3000:]
    assert "(deepspeed) exited: stopping at the end of this optimizer step" in log
    assert f"exits with return code = {EXIT_STOPPED}" in log  # the launcher's report of its rank

    assert ("resuming at step 4 with 2 -> 1 rank; global batch 16 -> 8 samples (micro batch 8 x accumulation 1 x 1 "
            "rank), the data going on from sample 64 of epoch 0; schedule 8 -> 400 optimizer steps; learning rate "
            "2.500e-03 -> 2.500e-03") in log
    per_epoch = int(re.search(r"(\d+) drawn per epoch", log).group(1))
    plan = StepPlan((SourceDraw(0, per_epoch, per_epoch),), 1, 0, 8, 1, seed=0, start=DataPosition(4, 0, 64))
    state = json.loads((stopped / "trainer_state.json").read_text())
    position = plan.position(saved)
    assert (state["data_epoch"], state["data_offset"]) == (position.epoch, position.offset)
    assert (state["samples_per_step"], state["total_steps"]) == (8, 400)


@pytest.mark.slow
def test_a_preemption_during_the_data_preparation_exits_for_the_requeue_which_trains(tmp_path: Path) -> None:
    """SIGTERM to every process of a job while its data preparation runs (the preparation is a forked process, and
    dies of it): the rank exits with EXIT_STOPPED and its line, not a traceback and status 1, and the same command,
    run again, trains."""
    run = tmp_path / "run"
    args = [*TINY, "max_steps=2", "save_steps=2", f"output_dir={run}", f"data_cache_dir={tmp_path / 'cache'}",
            "resume_from_checkpoint=auto"]
    log = tmp_path / "stopped.log"
    job = subprocess.Popen([sys.executable, str(FAULT_WORKER), *args], cwd=REPO, stdout=log.open("w"),
                           stderr=subprocess.STDOUT, start_new_session=True,
                           env=cpu_env(FAULT_RANK="0", FAULT_SLOW_PREPARATION="300"))
    try:
        wait_for(lambda: "fault: the data preparation" in log.read_text(), job, "the data preparation")
        os.killpg(job.pid, signal.SIGTERM)
        assert job.wait(timeout=STOP_WITHIN_S) == EXIT_STOPPED, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):  # a failed test leaves no sleeping preparation behind
            os.killpg(job.pid, signal.SIGKILL)
    said = log.read_text()
    assert "Traceback" not in said, said[-3000:]
    assert f"stopped (received SIGTERM) during the data preparation: the chunks it finished stay for the next start; " \
           f"exit status {EXIT_STOPPED}: run the same command again to continue" in said
    assert not list(run.glob("checkpoint-*"))

    check_ok(run_torchrun(args, nproc=1))
    assert resolve_checkpoint("latest", run).name == "checkpoint-000002"


@pytest.mark.slow
def test_a_second_signal_during_the_stops_save_exits_without_committing(tmp_path: Path) -> None:
    """SIGUSR1 to the rank, then again while its save sleeps: it exits at once with 128 + SIGUSR1, which the launcher
    and the runner pass on; the half-written save stays a staging folder, never loaded."""
    run = tmp_path / "run"
    job = start_in_its_own_session([*TINY, "max_steps=400", "save_steps=1000", "logging_steps=1", f"output_dir={run}"],
                                   tmp_path / "job.log", script=FAULT_WORKER, ranks=1, FAULT_SLOW_SAVE="120")
    wait_for(lambda: last_logged_step(run) >= 2, job, "step 2")
    (rank,) = ranks_of(job)
    rank.send_signal(signal.SIGUSR1)
    wait_for(lambda: any(run.glob(".staging-checkpoint-*")), job, "the stop's save")
    time.sleep(REPEAT_WINDOW_S + 0.5)
    rank.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=STOP_WITHIN_S) == 128 + signal.SIGUSR1
    assert not list(run.glob("checkpoint-*")) and not (run / "latest").exists()
    assert "received SIGUSR1 again" in (tmp_path / "job.log").read_text()


def test_a_process_forked_during_training_dies_of_the_signals_as_before() -> None:
    """A data worker forked while a stop is handled has no watching thread: it must not ignore a SIGTERM."""
    stop = StopRequest(grace_period=60)
    stop.start()
    try:
        ready, started = os.pipe()
        child = os.fork()
        if child == 0:  # the worker: says it runs, then waits to be terminated
            os.write(started, b"1")
            time.sleep(30)
            os._exit(0)
        os.read(ready, 1)
        os.close(ready)
        os.close(started)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert not stop.asked  # the parent was not asked
    finally:
        stop.close()
