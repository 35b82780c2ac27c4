"""The defaults a training process sets for itself (environment.py): only where the user has not."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from model_training.environment import apply_training_defaults

NAMES = ("TOKENIZERS_PARALLELISM", "WANDB_MODE", "WANDB_API_KEY", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")


@pytest.fixture
def bare_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """None of the variables set, and a home folder without a ~/.netrc."""
    for name in NAMES:
        monkeypatch.setenv(name, "")  # records the value before (or its absence), which the undo restores
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.usefixtures("bare_environment")
def test_a_bare_shell_gets_what_setup_env_sets() -> None:
    applied = apply_training_defaults()
    expected = {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
                "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
    if not torch.cuda.is_available():
        expected["DS_ACCELERATOR"] = "cpu"
    assert sorted(applied) == sorted(f"{name}={value}" for name, value in expected.items())
    assert {name: os.environ[name] for name in expected} == expected


@pytest.mark.usefixtures("bare_environment")
def test_what_the_user_set_is_kept_and_a_wandb_login_stays_online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    applied = apply_training_defaults()
    assert not any(a.split("=")[0] in ("TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM", "WANDB_MODE") for a in applied)
    assert (os.environ["TORCH_EXTENSIONS_DIR"], os.environ["TOKENIZERS_PARALLELISM"]) == ("/somewhere/else", "true")
    assert "WANDB_MODE" not in os.environ


@pytest.mark.usefixtures("bare_environment")
def test_a_netrc_login_counts_as_a_wandb_login(tmp_path: Path) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    apply_training_defaults()
    assert "WANDB_MODE" not in os.environ

