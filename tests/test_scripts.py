"""The shell scripts users run: they must at least parse, the quick start must name real commands and hand the
launcher its options."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DEEPSPEED, REPO, check_ok, cpu_env, run_deepspeed

from model_training.training.plot import curves, read_records, stage_of

SCRIPTS = ["scripts/setup_env.sh", "scripts/test.sh", "scripts/quickstart.sh", "scripts/rlhf_quickstart.sh",
           "scripts/launch_args.sh", "scripts/slurm/train_sft.sbatch", ".ci/run"]


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


FAKE_PYTHON = """#!/bin/bash
# The environment's python as the quick start calls it: records its command line; prints a free port through the
# real interpreter; no GPU; every other call (pip, export, generate) does nothing here.
echo "python $*" >> "$CALLS"
if [ "$1 $2" = "-m model_training.ports" ]; then exec "$REAL_PYTHON" -m model_training.ports; fi
if [ "$1" = "-c" ]; then exit 1; fi
"""
FAKE_DEEPSPEED = """#!/bin/bash
echo "deepspeed $*" >> "$CALLS"
"""
FAILING_DEEPSPEED = """#!/bin/bash
echo "$*" > "$CALLS"
exit 3
"""


@pytest.mark.parametrize(
    ("arguments", "launcher", "trainer"),
    [
        (["max_steps=3"], r"--log_level warning --master_port (\d+)", "max_steps=3"),
        (["--master_port", "29611", "--num_gpus", "1", "--", "max_steps=3", "save_steps=1"],
         "--log_level warning --master_port 29611 --num_gpus 1", "max_steps=3 save_steps=1"),
        (["--master_port=29612", "--log_level", "info", "--"], "--master_port=29612 --log_level info", ""),
    ],
)
def test_the_quick_start_passes_options_before_a_double_dash_to_the_launcher(
    arguments: list[str], launcher: str, trainer: str, tmp_path: Path
) -> None:
    """Its launcher line: a free port unless --master_port is given, the launcher's warnings only unless a log level
    is given; the trainer gets what follows `--` (everything, without one)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    for name, text in (("python", FAKE_PYTHON), ("deepspeed", FAKE_DEEPSPEED)):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {**os.environ, "VENV": str(venv), "CALLS": str(calls), "REAL_PYTHON": sys.executable,
           "PYTHONPATH": str(REPO)}
    result = subprocess.run(["bash", str(REPO / "scripts/quickstart.sh"), *arguments], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (line,) = [call for call in calls.read_text().splitlines() if call.startswith("deepspeed ")]
    expected = (rf"deepspeed --num_gpus 2 {launcher} trainer_sft\.py --configs defaults tiny-falcon oasst-sample "
                rf"output_dir=runs/tiny-falcon overwrite_output_dir=true{' ' + trainer if trainer else ''}")
    found = re.fullmatch(expected, line)
    assert found, line
    if found.groups():
        assert int(found.group(1)) != 29500
    assert "next: source" in result.stdout


@pytest.mark.parametrize(
    ("args", "launcher", "overrides"),
    [
        ([], None, ""),
        (["max_steps=2"], None, " max_steps=2"),
        (["--master_port", "29600", "--", "max_steps=2"], "29600", " max_steps=2"),
        (["--num_gpus", "1", "--"], None, ""),
    ],
)
def test_the_rlhf_quick_start_passes_launcher_options_and_overrides_as_quickstart_does(
    args: list[str], launcher: str | None, overrides: str, tmp_path: Path
) -> None:
    """Options before a `--` reach the launcher (a free port unless one is named), the rest every trainer; a stand-in
    for deepspeed records its command line and fails, which stops the script there (set -e)."""
    (tmp_path / "deepspeed").write_text(FAILING_DEEPSPEED)
    (tmp_path / "deepspeed").chmod(0o755)
    calls = tmp_path / "calls"
    env = cpu_env(RUNS=str(tmp_path / "runs"), CALLS=str(calls))
    env["PATH"] = f"{tmp_path}:{Path(DEEPSPEED).parent}:{env['PATH']}"
    result = subprocess.run(["bash", str(REPO / "scripts/rlhf_quickstart.sh"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    line = calls.read_text().strip()
    found = re.fullmatch(r"--num_gpus (\d) (?:.*?)--master_port (\d+) trainer_sft\.py --configs defaults tiny-falcon "
                         r"oasst-sample output_dir=\S+/runs/tiny-falcon overwrite_output_dir=true(.*)", line)
    assert found, line
    assert found.group(1) == "2" and ("--num_gpus 1" in line) == ("1" in args)  # the later --num_gpus wins
    assert found.group(2) == launcher if launcher else found.group(2) != "29500"
    assert found.group(3) == overrides


def chain_stage_of(run: Path) -> str:
    """The stage whose panels `run`'s training_curves.png shows (the same records drew it when the run ended)."""
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_records(run / "metrics.jsonl")
    assert all(series.steps.size for panel in curves(records)[:2] for series in panel.series[:1])
    return stage_of(records)


@pytest.mark.slow
@pytest.mark.heavy
def test_the_rlhf_quick_start_runs_every_stage_from_the_one_before_and_each_export_answers(tmp_path: Path) -> None:
    """scripts/rlhf_quickstart.sh as the README runs it, in the project's environment (which it keeps), its runs in a
    scratch folder; a launcher option reaches the launcher. Minutes on 2 cores: its cheaper twin is the next test."""
    env = cpu_env(RUNS=str(tmp_path))
    env["PATH"] = f"{Path(DEEPSPEED).parent}:{env['PATH']}"  # the environment's python and deepspeed, as activated
    start = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "scripts/rlhf_quickstart.sh"), "--num_gpus", "2", "--"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    print(f"rlhf_quickstart.sh: {time.monotonic() - start:.0f} s")
    check_ok(result)
    ports = set(re.findall(r"--master_port[= ](\d+)", result.stdout))
    assert ports and "29500" not in ports, ports  # a free port, taken by the script, not the launcher's default
    stages = {name: chain_stage_of(tmp_path / name) for name in ("tiny-falcon", "tiny-rm", "tiny-dpo", "tiny-ppo")}
    assert stages == {"tiny-falcon": "sft", "tiny-rm": "rm", "tiny-dpo": "dpo", "tiny-ppo": "rl"}
    for name in stages:
        assert (tmp_path / f"{name}-export" / "config.json").is_file()
    assert result.stdout.count("\nA: ") == 3  # the three chat models answered
    assert len(re.findall(r"reward of '[^']+': -?\d+\.\d{3}", result.stdout)) == 2  # the reward model scored
    rm_start = (tmp_path / "tiny-rm" / "config.yaml").read_text()
    assert f"model_name: {tmp_path / 'tiny-falcon'}" in rm_start


@pytest.mark.slow
def test_the_tiny_reward_model_starts_from_an_sft_run_and_plots_its_own_metrics(
    zero2_run: Path, tmp_path: Path
) -> None:
    """One stage of the chain, the cheap twin of the test above: the tiny-rm section from an SFT run, 2 steps."""
    run = tmp_path / "tiny-rm"
    check_ok(run_deepspeed(["--configs", "defaults-rm", "tiny-falcon", "preference-sample", "tiny-rm",
                            f"model_name={zero2_run}", f"output_dir={run}", "max_steps=2", "eval_steps=2"],
                           script=REPO / "trainer_rm.py"))
    assert chain_stage_of(run) == "rm"
    titles = [panel.title for panel in curves(read_records(run / "metrics.jsonl"))]
    assert titles[:3] == ["loss", "accuracy", "margin"]
