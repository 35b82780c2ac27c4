"""`--no-deepspeed` through the real CLIs on the CPU: the same loop on plain PyTorch (training/torch_engine.py), in
one process and under torchrun with DDP, against DeepSpeed, across a kill and a resume, and through the export.

Every run is the tiny model for 6 steps with checkpoints at 3 and 6. Losses are compared exactly wherever the
arithmetic is the same (the reasons are with each test): a difference in the last bit shows a real change.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    FAULT_WORKER,
    REPO,
    TINY,
    VOCAB_ROWS,
    assert_same_weights,
    check_ok,
    cpu_env,
    free_port,
    metrics_by_step,
    read_metrics,
    run_deepspeed,
    run_torchrun,
    step_losses,
)
from transformers import AutoModelForCausalLM

from model_training.checkpoints.read import resolve_checkpoint
from model_training.export.export import export_model
from model_training.export.writer import parse_size
from model_training.layout import TORCH_MODEL_STATES, TORCH_OPTIM_STATES

pytestmark = pytest.mark.slow

RUN = [*TINY, "max_steps=6", "save_steps=3", "logging_steps=1"]
ACCUMULATE_2 = [*RUN, "gradient_accumulation_steps=2"]
"""2 micro-batches of 8 samples per step on each rank."""
PLAIN = [*ACCUMULATE_2, "--no-deepspeed"]


def engine_files(ckpt: Path) -> dict[str, dict]:
    """The plain engine's two files of a checkpoint, loaded: the model's state dict, the optimizer and scheduler."""
    (tag,) = ckpt.glob("global_step*")
    return {name: torch.load(tag / name, weights_only=True) for name in (TORCH_MODEL_STATES, TORCH_OPTIM_STATES)}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return engine_files(ckpt)[TORCH_MODEL_STATES]["module"]


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python trainer_sft.py ... --no-deepspeed`: a process alone, no launcher."""
    run = tmp_path_factory.mktemp("one_rank") / "run"
    check_ok(run_torchrun([*PLAIN, f"output_dir={run}"], nproc=1))
    return run


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`torchrun --nproc_per_node 2 trainer_sft.py ... --no-deepspeed`: DDP over gloo, its gradients reduced once per
    step, in the backward of each rank's second micro-batch."""
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    check_ok(run_torchrun([*PLAIN, f"output_dir={run}"], nproc=2))
    return run


def test_one_process_trains_as_deepspeed_zero2_does(one_rank_run: Path, tmp_path: Path) -> None:
    """The same config on one DeepSpeed ZeRO-2 rank gives the same losses and weights, bit for bit.

    Both run PyTorch's AdamW (DeepSpeed's `torch_adam`) in fp32 on the same gradients: ZeRO-2 copies them into its
    flat buffer and steps the flat fp32 copy of the weights, which changes no value. Only the gradient norms are
    summed differently (DeepSpeed's differ by ~1e-5 relative), so the runs would part where clipping acts: no
    step here reaches max_grad_norm 2.0, which the test checks too.
    """
    deepspeed = tmp_path / "deepspeed"
    check_ok(run_deepspeed([*ACCUMULATE_2, f"output_dir={deepspeed}"], nproc=1))
    losses = step_losses(one_rank_run)
    assert abs(losses[1] - math.log(VOCAB_ROWS)) < 0.5, losses[1]
    assert losses[6] < losses[1] - 0.5
    assert losses == step_losses(deepspeed)
    for plain, zero2 in zip(read_metrics(one_rank_run), read_metrics(deepspeed), strict=True):
        assert plain["grad_norm"] == pytest.approx(zero2["grad_norm"], rel=1e-4)
        assert plain["grad_norm"] < 2.0
        assert plain["lr"] == zero2["lr"]
    (zero2_states,) = (deepspeed / "checkpoint-000006").glob("global_step6/mp_rank_00_model_states.pt")
    assert_same_weights(weights(one_rank_run / "checkpoint-000006"),
                        torch.load(zero2_states, weights_only=False)["module"])


def test_checkpoint_layout(one_rank_run: Path, two_rank_run: Path) -> None:
    """The engine's state is written once, by rank 0 (it is the same on every rank); the RNG states per rank."""
    for run, ranks in ((one_rank_run, 1), (two_rank_run, 2)):
        ckpt = resolve_checkpoint("latest", run)
        assert ckpt.name == "checkpoint-000006"
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert (manifest["world_size"], manifest["zero_stage"]) == (ranks, 0)
        engine = sorted(name for name in manifest["files"] if name.startswith("global_step6/"))
        assert engine == [f"global_step6/{TORCH_MODEL_STATES}", f"global_step6/{TORCH_OPTIM_STATES}"]
        assert sorted(p.name for p in (ckpt / "rng").iterdir()) == [f"rank-{r:05d}.pt" for r in range(ranks)]
        assert {t.dtype for t in weights(ckpt).values()} == {torch.float32}


def test_two_ranks_under_torchrun_match_one_rank_with_twice_the_accumulation(
    two_rank_run: Path, tmp_path: Path
) -> None:
    """2 ranks x 2 micro-batches and 1 rank x 4 train on the same 32 samples per step. The loop scales each loss by
    the world size and DDP averages over the ranks, as DeepSpeed does, so both apply the gradient of the whole
    step's token mean. The four micro-batch gradients are added in another order, ((a + b) + (c + d)) against
    (((a + b) + c) + d): a few float32 roundings, measured at up to 3e-8 of the loss, far below what a missing
    or doubled normalization would change (a factor of 2). With one micro-batch per rank against two on one rank
    the runs are bit-identical (two terms, and scaling by 2 is exact)."""
    one_rank = tmp_path / "one_rank"
    check_ok(run_torchrun([*PLAIN, "gradient_accumulation_steps=4", f"output_dir={one_rank}"], nproc=1))
    two, one = read_metrics(two_rank_run), read_metrics(one_rank)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["lr"] == b["lr"]
    assert two[-1]["eval/oasst_export/loss"] == pytest.approx(one[-1]["eval/oasst_export/loss"], rel=1e-5)
    for name, tensor in weights(two_rank_run / "checkpoint-000006").items():
        torch.testing.assert_close(tensor, weights(one_rank / "checkpoint-000006")[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("ranks", "reference"), [(1, "one_rank_run"), (2, "two_rank_run")])
def test_killed_run_resumes_exactly(ranks: int, reference: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """SIGKILL (the last rank) right after checkpoint 3 is committed; resumed in its folder, steps 4-6 and the final
    weights, AdamW moments and schedule are the uninterrupted run's, bit for bit."""
    reference_run: Path = request.getfixturevalue(reference)
    args = [*PLAIN, f"output_dir={tmp_path}"]
    killed = run_torchrun(args, nproc=ranks, script=FAULT_WORKER, FAULT_KILL_AFTER_SAVE_STEP="3",
                          FAULT_RANK=str(ranks - 1))
    assert killed.returncode != 0
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-000003"
    assert not (tmp_path / "checkpoint-000006").exists()

    resumed = check_ok(run_torchrun([*args, "--resume_from_checkpoint"], nproc=ranks))
    assert "resumed from" in resumed.stdout and "at optimizer step 3" in resumed.stdout
    mine, theirs = metrics_by_step(tmp_path), metrics_by_step(reference_run)
    assert [mine[step] for step in (4, 5, 6)] == [theirs[step] for step in (4, 5, 6)]
    after, uninterrupted = (engine_files(run / "checkpoint-000006") for run in (tmp_path, reference_run))
    assert_same_weights(after[TORCH_MODEL_STATES]["module"], uninterrupted[TORCH_MODEL_STATES]["module"])
    optimizer, reference_optimizer = (files[TORCH_OPTIM_STATES] for files in (after, uninterrupted))
    assert optimizer["lr_scheduler"] == reference_optimizer["lr_scheduler"]
    moments, reference_moments = (o["optimizer"]["state"] for o in (optimizer, reference_optimizer))
    assert moments.keys() == reference_moments.keys()
    for index, state in moments.items():
        assert state.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(state[k], reference_moments[index][k]) for k in state)


def test_a_two_rank_run_resumes_in_a_process_alone(two_rank_run: Path, tmp_path: Path) -> None:
    """The plain engine's state is every rank's: checkpoint 3 of the 2-rank DDP run resumes in one process with twice
    the accumulation (the same 32 samples a step), its RNG streams derived anew, and steps 4-6 follow the uninterrupted
    run within float32 rounding (four micro-batch gradients added in another order)."""
    result = check_ok(run_torchrun([*PLAIN, "gradient_accumulation_steps=4", f"output_dir={tmp_path}",
                                    f"resume_from_checkpoint={two_rank_run / 'checkpoint-000003'}"], nproc=1))
    assert "resuming at step 3 with 2 -> 1 rank; global batch unchanged (32 samples)" in result.stdout
    mine, theirs = step_losses(tmp_path), step_losses(two_rank_run)
    assert sorted(mine) == [4, 5, 6]
    assert [mine[step] for step in (4, 5, 6)] == pytest.approx([theirs[step] for step in (4, 5, 6)], rel=1e-5)
    assert not (two_rank_run / "checkpoint-000003" / "universal").exists()  # nothing to convert


def test_export_loads_in_transformers_with_the_trained_weights(one_rank_run: Path, tmp_path: Path) -> None:
    """export_model.py reads the plain checkpoint into the same Hugging Face folder as a DeepSpeed one: sharded,
    with the tokenizer and configs, and the fp32 weights as they were trained."""
    folder = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, str(REPO / "export_model.py"), str(one_rank_run), "--dtype", "fp32", "--output_folder",
         str(folder), "--max_shard_size", "300KB"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "plain PyTorch weights" in result.stderr
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert_same_weights(model.state_dict(), weights(one_rank_run / "checkpoint-000006"))


def test_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(tmp_path: Path) -> None:
    """Rank 1's loss is NaN at step 3: the averaged gradients are NaN on both ranks, and both skip the update and
    hold the schedule (as DeepSpeed's ZeRO-1/2 do); training goes on at step 4."""
    # One micro-batch per step, which the fault worker's step count assumes.
    args = [*PLAIN, f"output_dir={tmp_path}", "gradient_accumulation_steps=1", "save_steps=1", "save_total_limit=null"]
    result = check_ok(run_torchrun(args, script=FAULT_WORKER, FAULT_NAN_AT_STEPS="3"))
    assert "non-finite loss at optimizer step 3" in result.stdout
    before, after, later = (weights(tmp_path / f"checkpoint-00000{step}") for step in (2, 3, 4))
    assert_same_weights(before, after)  # rank 0 saves: it skipped too
    assert not torch.equal(after["transformer.h.0.mlp.dense_h_to_4h.weight"],
                           later["transformer.h.0.mlp.dense_h_to_4h.weight"])
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert math.isnan(records[3]["loss"]) and records[3]["skipped_steps"] == 1
    assert records[3]["lr"] == records[2]["lr"] < records[4]["lr"]  # the warmup waited a step
    assert math.isfinite(records[6]["loss"]) and records[6]["skipped_steps"] == 1


def test_bf16_trains_under_autocast_on_fp32_master_weights(one_rank_run: Path, tmp_path: Path) -> None:
    check_ok(run_torchrun([*PLAIN, f"output_dir={tmp_path}", "dtype=bf16", "max_steps=3"], nproc=1))
    losses, fp32_losses = step_losses(tmp_path), step_losses(one_rank_run)
    # bf16 products round differently from fp32 ones (so autocast is on), by far less than what a step learns.
    assert losses[1] != fp32_losses[1] and losses[1] == pytest.approx(fp32_losses[1], abs=0.02)
    assert losses[3] < losses[1] - 0.1
    assert {t.dtype for t in weights(tmp_path / "checkpoint-000003").values()} == {torch.float32}


def test_lora_checkpoint_holds_only_the_adapters_and_exports(tmp_path: Path) -> None:
    run = tmp_path / "run"
    check_ok(run_torchrun([*PLAIN, f"output_dir={run}", "peft.type=lora", "peft.r=8", "learning_rate=1e-2",
                           "max_steps=3"], nproc=1))
    losses = step_losses(run)
    assert losses[3] < losses[1]
    trained = weights(run / "checkpoint-000003")
    assert trained and all(".lora_" in name or ".trainable_tokens_" in name for name in trained)
    folder = export_model(run, tmp_path / "adapter", torch.float32, parse_size("2GB"))
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()


def test_a_checkpoint_resumes_only_on_the_engine_that_saved_it(one_rank_run: Path, tmp_path: Path) -> None:
    """A plain checkpoint holds no DeepSpeed engine files: resuming it on DeepSpeed is refused before anything is
    built (the other way round: a row of tests/test_faults.py)."""
    ckpt = one_rank_run / "checkpoint-000003"
    result = run_torchrun([*RUN, f"output_dir={tmp_path}", f"resume_from_checkpoint={ckpt}"], nproc=1,
                          MASTER_PORT=str(free_port()))
    assert result.returncode == 2
    assert (f"error: cannot resume from {ckpt}: it was saved by a run without DeepSpeed, whose engine state this run "
            "cannot load; resume it with deepspeed=false") in result.stdout
