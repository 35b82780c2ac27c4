"""Resume on another number of ranks (model_training/training/reshard.py, resume.py): the universal conversion holds
what DeepSpeed's own converter writes, and a run resumed on 1, 2 or 4 ranks continues as the uninterrupted run does,
within float32 rounding (the gradients are reduced in another order), on ZeRO-2, ZeRO-3 and the plain PyTorch engine
(tests/training/test_no_deepspeed_e2e.py)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, RESUME_RUN, TINY_RUN, check_ok, run_deepspeed, step_losses

from model_training.checkpoints.read import verify_checkpoint
from model_training.layout import UNIVERSAL_DIR
from model_training.training.reshard import ZERO_DIR, convert_for_any_ranks

pytestmark = pytest.mark.slow

RELATIVE_TOLERANCE = 1e-5


def universal_states(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's fp32, exp_avg and exp_avg_sq in a universal checkpoint's zero/ folder (DeepSpeed writes
    ZeRO-3's as bare tensors, ZeRO-1/2's as {"param": tensor})."""
    states = {}
    for name in sorted(os.listdir(folder)):
        if (folder / name).is_dir() and (folder / name / "exp_avg.pt").is_file():
            loaded = {key: torch.load(folder / name / f"{key}.pt", weights_only=False)
                      for key in ("fp32", "exp_avg", "exp_avg_sq")}
            states[name] = {key: (value["param"] if isinstance(value, dict) else value).flatten()
                            for key, value in loaded.items()}
    return states


@pytest.mark.parametrize("fixture", ["zero2_run", "zero3_run"])
def test_the_conversion_holds_what_deepspeeds_converter_writes_and_is_kept(
    fixture: str, tmp_path: Path, one_rank_group: None, request: pytest.FixtureRequest
) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ckpt = Path(shutil.copytree(request.getfixturevalue(fixture) / "checkpoint-000004", tmp_path / "checkpoint"))
    convert_for_any_ranks(ckpt, [ckpt], verify_hashes=True)
    converted = ckpt / UNIVERSAL_DIR
    manifest = verify_checkpoint(converted, check_hashes=True)
    assert manifest["converted_from_world_size"] == 2 and manifest["step"] == 4
    verify_checkpoint(ckpt, check_hashes=True)  # the checkpoint itself is as it was committed

    # DeepSpeed's converter on the same shards (it wants a universal_checkpoint_info our engines do not write).
    ds_to_universal(argparse.Namespace(
        input_folder=str(ckpt / "global_step4"), output_folder=str(tmp_path / "deepspeed" / "global_step4"),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    ours = universal_states(converted / "global_step4" / ZERO_DIR)
    theirs = universal_states(tmp_path / "deepspeed" / "global_step4" / ZERO_DIR)
    assert ours.keys() == theirs.keys() and len(ours) == 15
    for name, states in ours.items():
        for key, tensor in states.items():
            assert torch.equal(tensor, theirs[name][key]), (name, key)
            assert key != "exp_avg_sq" or tensor.abs().max() > 0  # the moments are real, not zeros

    # A later resume reuses it, the files checked against their manifest.
    before = {p: p.stat().st_mtime_ns for p in converted.rglob("*")}
    convert_for_any_ranks(ckpt, [ckpt], verify_hashes=True)
    assert {p: p.stat().st_mtime_ns for p in converted.rglob("*")} == before


def copied_checkpoint(run: Path, step: int, tmp_path: Path) -> Path:
    """A copy of a session run's checkpoint: the conversion is kept beside the checkpoint, and the session's runs stay
    as other tests expect them."""
    name = f"checkpoint-{step:06d}"
    return Path(shutil.copytree(run / name, tmp_path / "source" / name))


# ZeRO-2's twin reruns what the 40-step tables below prove; ZeRO-3's runs always (it is the cheaper twin of those).
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.heavy), 3])
def test_a_2_rank_run_resumes_on_1_rank_and_goes_on_as_it_would_have(
    stage: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """From checkpoint 4 of the 2-rank run, on 1 rank with twice the accumulation (the same global batch): steps 5-8
    read the same samples and their losses are the uninterrupted run's within float32 rounding.

    The ZeRO-3 run keeps its parameters in 3 sub-groups (a small sub_group_size): DeepSpeed's universal load hands one
    step tensor to all of them, which PyTorch's Adam increments in place, once per sub-group (the losses of steps 6-8
    were up to 0.4% off here until checkpoint.py gave each sub-group its own)."""
    if stage == 2:
        reference, config = request.getfixturevalue("zero2_run"), REPO / "configs" / "zero_config.json"
    else:
        config = tmp_path / "zero3_sub_groups.json"
        settings = json.loads((REPO / "configs" / "zero3_config.json").read_text())
        settings["zero_optimization"]["sub_group_size"] = 30000  # the tiny model's 0.2M parameters in 3 sub-groups
        config.write_text(json.dumps(settings))
        reference = tmp_path / "uninterrupted"
        check_ok(run_deepspeed([*TINY_RUN, f"output_dir={reference}", f"deepspeed_config={config}"]))
    ckpt = copied_checkpoint(reference, 4, tmp_path)
    result = check_ok(run_deepspeed([*TINY_RUN, f"output_dir={tmp_path / 'run'}", "gradient_accumulation_steps=2",
                                     f"deepspeed_config={config}", f"resume_from_checkpoint={ckpt}"], nproc=1))
    assert "resuming at step 4 with 2 -> 1 rank; global batch unchanged (16 samples)" in result.stdout
    assert (ckpt / UNIVERSAL_DIR / "manifest.json").is_file()
    assert_same_losses(tmp_path / "run", reference, range(5, 9))


def assert_same_losses(resumed: Path, reference: Path, steps: range) -> float:
    """The resumed run's losses of `steps` are the reference's within RELATIVE_TOLERANCE; prints both side by side and
    returns the largest relative difference."""
    mine, theirs = step_losses(resumed), step_losses(reference)
    assert sorted(s for s in mine if s in steps) == list(steps)
    worst = 0.0
    print(f"{'step':>4} {'uninterrupted':>14} {'resumed':>14} {'relative':>9}")
    for step in steps:
        difference = abs(mine[step] / theirs[step] - 1)
        worst = max(worst, difference)
        print(f"{step:>4} {theirs[step]:>14.10f} {mine[step]:>14.10f} {difference:>9.1e}")
    print(f"largest relative difference {worst:.1e}")
    assert worst <= RELATIVE_TOLERANCE
    return worst


# The 40-step tables of docs/internals.md: minutes on 2 cores (`pytest -m heavy -s` prints them). Each resumes from a
# checkpoint at step 20 of an 80-step schedule and compares steps 21-60.


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("source_ranks", "ranks", "overrides"),
    [(2, 1, ["gradient_accumulation_steps=2"]), (1, 2, []), (2, 4, ["per_device_train_batch_size=4"])],
    ids=["2-to-1", "1-to-2", "2-to-4"],
)
def test_40_steps_after_a_resume_on_another_number_of_ranks_match_the_uninterrupted_run(
    source_ranks: int, ranks: int, overrides: list[str], run_80: Path, tmp_path: Path
) -> None:
    """ZeRO-2, the global batch kept (micro batch x accumulation x ranks = 16 samples): steps 21-60 against run_80's
    (2 ranks throughout)."""
    source = run_80
    if source_ranks == 1:  # the whole run on 1 rank with twice the accumulation; its checkpoint 20 is resumed
        source = tmp_path / "one_rank"
        check_ok(run_deepspeed([*RESUME_RUN, f"output_dir={source}", "gradient_accumulation_steps=2"], nproc=1))
    ckpt = copied_checkpoint(source, 20, tmp_path)
    resumed = tmp_path / "resumed"
    check_ok(run_deepspeed([*RESUME_RUN, "max_steps=80", f"output_dir={resumed}", *overrides,
                            f"resume_from_checkpoint={ckpt}"], nproc=ranks))
    assert_same_losses(resumed, run_80, range(21, 61))


@pytest.mark.heavy
@pytest.mark.parametrize("stage", [1, 3])
def test_40_steps_after_a_zero1_or_zero3_resume_on_1_rank_match_the_uninterrupted_run(
    stage: int, tmp_path: Path
) -> None:
    """2 -> 1 on ZeRO-1 and ZeRO-3, each against its own uninterrupted 2-rank run."""
    config = tmp_path / f"zero{stage}.json"
    settings = json.loads((REPO / "configs" / ("zero3_config.json" if stage == 3 else "zero_config.json")).read_text())
    settings["zero_optimization"]["stage"] = stage
    config.write_text(json.dumps(settings))
    runs = [*RESUME_RUN, f"deepspeed_config={config}"]
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    check_ok(run_deepspeed([*runs, f"output_dir={reference}"]))
    check_ok(run_deepspeed([*runs, f"output_dir={resumed}", "gradient_accumulation_steps=2",
                            f"resume_from_checkpoint={copied_checkpoint(reference, 20, tmp_path)}"], nproc=1))
    assert_same_losses(resumed, reference, range(21, 61))
