"""The table of stages (model_training/stages.py): every row's behaviours import and take what their callers pass,
every command runs its row, and a stage added as one module and one row trains through the real command line."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, check_ok, cpu_env

from model_training.config import ConfigError, load_config
from model_training.layout import MANIFEST, METRICS, RUN_CONFIG, checkpoint_name
from model_training.references import resolve_function
from model_training.stages import STAGES, Stage

ARGUMENTS = {"recipe": 2, "prepare": 2, "stats": 2, "check": 2, "spec": 3}
"""What each behaviour is called with (stages.py): recipe(cfg, export), prepare(cfg, tokenizer), stats(cfg,
tokenizer), check(cfg, command), spec(cfg, tokenizer, engine)."""


@pytest.mark.parametrize("stage", list(STAGES.values()), ids=list(STAGES))
def test_every_behaviour_a_row_names_imports_and_takes_its_callers_arguments(stage: Stage) -> None:
    assert stage.name in STAGES and STAGES[stage.name] is stage
    for field, count in ARGUMENTS.items():
        path = getattr(stage, field)
        if path is None:
            continue
        parameters = inspect.signature(resolve_function(path, field)).parameters.values()
        required = [p for p in parameters if p.default is inspect.Parameter.empty]
        assert len(required) == count, f"{stage.name}.{field} = {path} takes {[p.name for p in required]}"


@pytest.mark.parametrize("stage", list(STAGES.values()), ids=list(STAGES))
def test_every_stage_has_its_command_which_runs_its_row(stage: Stage) -> None:
    script = (REPO / stage.command).read_text()
    expected = "main_train(sys.argv[1:])" if stage.name == "sft" else f'main_train(sys.argv[1:], stage="{stage.name}")'
    assert expected in script


def test_a_row_naming_a_missing_function_fails_with_the_stage_and_the_field() -> None:
    broken = Stage("broken", "trainer_sft.py", "", recipe="model_training.training.trainer:no_such_recipe",
                   prepare="", stats="")
    with pytest.raises(ConfigError, match="stage broken: recipe: module 'model_training.training.trainer' has no "
                                          "function 'no_such_recipe'"):
        broken.call("recipe")


def test_an_added_row_is_a_stage_the_config_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.training.toy_stage import STAGE

    with pytest.raises(ConfigError, match=r"key 'stage' is 'zsft'; expected one of null, sft, rm, dpo, rl$"):
        load_config(TINY[1:], [("stage", "zsft")])
    monkeypatch.setitem(STAGES, STAGE.name, STAGE)
    assert load_config(TINY[1:], stage="zsft").stage == "zsft"


TOY_COMMAND = """
import sys
from model_training.stages import STAGES
from tests.training.toy_stage import STAGE
STAGES[STAGE.name] = STAGE
from model_training.cli import exit_process, main_train
exit_process(main_train(sys.argv[1:], stage=STAGE.name))
"""
"""What a trainer_zsft.py would hold, with the row added at run time instead of in stages.py."""


@pytest.mark.slow
def test_a_stage_of_one_module_and_one_row_trains_through_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "zsft"
    result = subprocess.run(
        [sys.executable, "-c", TOY_COMMAND, *TINY, f"output_dir={out}", "max_steps=4", "logging_steps=1",
         "eval_steps=4", "save_steps=4", "--no-deepspeed"],
        cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    check_ok(result)
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # The spec's own metric, in training and in evaluation: log(Z)^2 of a random-weight model is far from 0.
    assert all(r["z_loss"] > 1 for r in steps) and any(key.endswith("/z_loss") for key in records[-1])
    assert re.search(r"^stage: zsft$", (out / RUN_CONFIG).read_text(), re.M)
    assert (out / checkpoint_name(4) / MANIFEST).is_file()
