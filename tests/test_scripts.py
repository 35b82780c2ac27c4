"""The shell scripts users run: they must at least parse, and the quick start must name real commands."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO

SCRIPTS = ["scripts/setup_env.sh", "scripts/test.sh", "scripts/quickstart.sh", "scripts/slurm/train_sft.sbatch",
           ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_script_parses(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_quick_start_runs_the_scripts_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (REPO / ".ci/run").read_text()


FAKE_SRUN = """#!/bin/bash
# srun as the SLURM script sees it: records its command line, runs until a signal, then exits as the ranks would.
echo "srun $*" >> "$CALLS"
trap 'echo "srun got USR1" >> "$CALLS"; exit 75' USR1
trap 'echo "srun got TERM" >> "$CALLS"; exit 75' TERM
touch "$CALLS.started"
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$CALLS"
if [ "$1" = show ]; then echo node-1; fi
"""


@pytest.mark.parametrize(("signal_name", "requeued"), [("USR1", True), ("TERM", False)])
def test_the_slurm_script_resumes_by_itself_and_requeues_when_the_time_limit_is_near(
    signal_name: str, requeued: bool, tmp_path: Path
) -> None:
    """USR1 (--signal=B:USR1@300, the time limit near) goes on to the ranks through srun; once they stopped with their
    checkpoint (status 75) the script requeues the job, whose unchanged command resumes (resume_from_checkpoint=auto).
    A preemption's SIGTERM reaches the ranks from SLURM itself; the script waits for them, and the requeue is SLURM's
    (--requeue)."""
    bin_dir, submit = tmp_path / "bin", tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_NODELIST": "node-[1-2]", "SLURM_JOB_ID": "42",
           "SLURM_CPUS_PER_TASK": "4"}
    script = subprocess.Popen(["bash", str(REPO / "scripts/slurm/train_sft.sbatch"), "--configs", "defaults",
                               "tiny-falcon"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not Path(f"{calls}.started").exists():
        assert script.poll() is None and time.monotonic() < deadline, script.communicate()[0]
        time.sleep(0.02)
    script.send_signal(getattr(signal, f"SIG{signal_name}"))
    if signal_name == "TERM":  # SLURM signals the tasks too; here srun stands for them
        subprocess.run(["pkill", "-TERM", "-P", str(script.pid), "-f", "srun"], check=True)
    output = script.communicate(timeout=30)[0]
    assert script.returncode == 75, output
    lines = calls.read_text().splitlines()
    assert lines[1] == ("srun --kill-on-bad-exit=1 python trainer_sft.py resume_from_checkpoint=auto --configs "
                        "defaults tiny-falcon")
    assert f"srun got {signal_name}" in lines
    assert ("scontrol requeue 42" in lines) == requeued, lines
