"""Shared fixtures: real multi-rank DeepSpeed runs of the tiny model on the CPU, through the real CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RESUME_RUN, TINY_RUN, check_ok, run_deepspeed


@pytest.fixture(scope="session", autouse=True)
def home_of_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home folder of the session's own, for every test and every process it starts: `data_cache_dir` defaults to
    ~/.cache/model_training/tokenized, which other jobs on the machine share, and whose contents would decide whether a
    test prepares its data or finds it prepared."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        yield home


def _train_tiny(tmp_path_factory: pytest.TempPathFactory, name: str, *overrides: str) -> Path:
    output_dir = tmp_path_factory.mktemp(name) / "run"
    check_ok(run_deepspeed([*TINY_RUN, f"output_dir={output_dir}", *overrides]))
    return output_dir


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-rank ZeRO-2 run of the tiny model: 8 steps, checkpoints at 4 and 8."""
    return _train_tiny(tmp_path_factory, "zero2", "deepspeed_config=configs/zero_config.json")


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run under ZeRO-3."""
    return _train_tiny(tmp_path_factory, "zero3", "deepspeed_config=configs/zero3_config.json")


@pytest.fixture(scope="session")
def run_80(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-rank ZeRO-2 run of RESUME_RUN that the resume tests must reproduce."""
    run = tmp_path_factory.mktemp("run_80") / "run"
    check_ok(run_deepspeed([*RESUME_RUN, f"output_dir={run}"]))
    return run


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A process group of this process alone, for code that all-reduces; gone after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
