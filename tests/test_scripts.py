"""The shell scripts users run: they must at least parse, and the quick start must name real commands."""

from __future__ import annotations

import subprocess

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
