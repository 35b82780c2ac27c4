"""The save policy of the loop, and what a checkpoint holds beside the engine state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from model_training.checkpoints.read import resolve_checkpoint
from model_training.config import TrainConfig, load_config, parse_override
from model_training.layout import MANIFEST, MODEL_CONFIG_DIR, RUN_CONFIG, TOKENIZER_DIR
from model_training.models.builder import build_model, load_tokenizer
from model_training.training.saver import Saver

TINY = ["defaults", "tiny-falcon", "oasst-sample"]


def config(*overrides: str) -> TrainConfig:
    return load_config(TINY, [parse_override(o) for o in overrides])


def saved_steps(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> list[int]:
    saver = Saver(cfg, tokenizer=None, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return [step for step in range(1, total_steps + 1) if saver.due(step)]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(["save_steps=4"], [4, 8, 10], id="every-save_steps-and-the-last"),
        pytest.param(["save_steps=5"], [5, 10], id="the-last-step-once"),
        pytest.param(["save_steps=50"], [10], id="only-the-last"),
        pytest.param(["save_strategy=epoch", "save_steps=4"], [3, 6, 9, 10], id="each-epoch-end-and-the-last"),
        pytest.param(["save_strategy=no"], [], id="never"),
    ],
)
def test_checkpoints_are_due_at_the_policy_steps(overrides: list[str], expected: list[int]) -> None:
    assert saved_steps(config(*overrides), total_steps=10, steps_per_epoch=3) == expected


class Engine:
    """The part of an engine's interface checkpoint.py uses, one rank, with the model as its only file."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.checkpoint_engine = self

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        Path(path).parent.mkdir(exist_ok=True)
        torch.save(state_dict, path)

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool, exclude_frozen_parameters: bool) -> None:
        self.checkpoint_engine.save({"module": self.module.state_dict()}, f"{save_dir}/{tag}/model.pt")

    def _copy_recovery_script(self, save_path: str) -> None:
        pass

    def zero_optimization_stage(self) -> int:
        return 0


def test_a_save_commits_the_engine_state_with_what_export_needs(tmp_path: Path) -> None:
    cfg = config(f"output_dir={tmp_path}", "save_total_limit=1")
    tokenizer = load_tokenizer(cfg)
    engine = Engine(build_model(cfg, tokenizer, {}))
    saver = Saver(cfg, tokenizer, total_steps=8, steps_per_epoch=4)
    saver.save(engine, 4, {"optimizer_step": 4})
    folder = saver.save(engine, 8, {"optimizer_step": 8})
    assert folder == tmp_path / "checkpoint-000008" == resolve_checkpoint("latest", tmp_path)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000008"]  # save_total_limit
    names = {p.name for p in folder.iterdir()}
    assert {MANIFEST, RUN_CONFIG, TOKENIZER_DIR, MODEL_CONFIG_DIR, "global_step8", "trainer_state.json"} <= names
    assert (folder / RUN_CONFIG).read_text().startswith("model_name: null")
    assert (folder / MODEL_CONFIG_DIR / "config.json").is_file()
