"""The real `trainer_sft.py` under real launchers, 2 CPU ranks: training, loss invariance, resume, faults."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    FAULT_WORKER,
    REPO,
    RESUME_RUN,
    TINY,
    TINY_RUN,
    VOCAB_ROWS,
    assert_same_weights,
    check_ok,
    cpu_env,
    free_port,
    metrics_by_step,
    read_metrics,
    run_deepspeed,
    step_losses,
)

from model_training.checkpoints.read import resolve_checkpoint
from model_training.generate import answer

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).with_name("golden_losses.json")
GOLDEN_FINGERPRINTS = Path(__file__).with_name("golden_fingerprints.json")


def module_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full module state of a ZeRO-1/2 checkpoint (ZeRO-2 keeps whole weights in the model-states file)."""
    (states,) = ckpt.glob("global_step*/mp_rank_00_model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def test_zero2_run_trains_evaluates_and_saves(zero2_run: Path) -> None:
    records = read_metrics(zero2_run)
    losses = step_losses(zero2_run)
    assert sorted(losses) == list(range(1, 9))
    # Random init: the first loss is near ln(vocabulary); then it falls.
    assert abs(losses[1] - math.log(VOCAB_ROWS)) < 0.5, losses[1]
    assert losses[8] < losses[1] - 0.5
    evals = [r for r in records if "eval/oasst_export/loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[1]["eval/oasst_export/loss"] < evals[0]["eval/oasst_export/loss"]
    assert 0.0 < evals[1]["eval/oasst_export/accuracy"] < 1.0
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["data_time"] > 0 for r in records if "loss" in r)
    assert (zero2_run / "config.yaml").read_text().startswith("model_name: null")
    assert resolve_checkpoint("latest", zero2_run).name == "checkpoint-000008"
    assert sorted(p.name for p in zero2_run.glob("checkpoint-*")) == ["checkpoint-000004", "checkpoint-000008"]
    saved = json.loads((zero2_run / "checkpoint-000008" / "trainer_state.json").read_text())
    assert saved["optimizer_step"] == 8 and saved["skipped_steps"] == 0


def test_zero3_run_trains_from_a_properly_initialized_model(zero3_run: Path) -> None:
    losses = step_losses(zero3_run)
    # Weights created inside zero.Init must still get the model's own initialization (a known trap).
    assert abs(losses[1] - math.log(VOCAB_ROWS)) < 0.5, losses[1]
    assert losses[8] < losses[1] - 0.5
    assert resolve_checkpoint("latest", zero3_run).name == "checkpoint-000008"
    assert list((zero3_run / "checkpoint-000008").glob("global_step8/zero_pp_rank_1_mp_rank_00_model_states.pt"))


def test_golden_losses(zero2_run: Path) -> None:
    """Per-step losses of the fixed-seed tiny run: a change of numerics must be a visible diff.

    Not bit-exact across machines: torch picks its CPU kernels by the vector units it finds (AVX2, AVX-512), and
    their fp32 sums differ in the last bits; the same run gave 7.109638061 and 7.109637756 at step 5 on two CPUs
    (4e-8 relative). The tolerance sits 25x above that and far below what a change of the data, the loss or the
    learning rate moves them by. After a deliberate change, regenerate with UPDATE_GOLDEN=1 and commit the new file.
    """
    losses = {str(step): loss for step, loss in step_losses(zero2_run).items()}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(losses, indent=2) + "\n")
    assert losses == pytest.approx(json.loads(GOLDEN.read_text()), rel=1e-6, abs=0)


def test_checkpoints_of_earlier_versions_stay_resumable(zero2_run: Path) -> None:
    """The data and model fingerprints a resume compares, as every earlier version of the trainer wrote them for this
    run: a change would refuse to resume their checkpoints. Regenerate with UPDATE_GOLDEN=1 only for a deliberate
    change (and say in the release notes that older checkpoints no longer resume)."""
    state = json.loads((zero2_run / "checkpoint-000008" / "trainer_state.json").read_text())
    fingerprints = {key: state[key] for key in ("data_fingerprint", "model_fingerprint")}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_FINGERPRINTS.write_text(json.dumps(fingerprints, indent=2) + "\n")
    assert fingerprints == json.loads(GOLDEN_FINGERPRINTS.read_text())


def test_loss_does_not_depend_on_how_the_step_is_split(tmp_path: Path) -> None:
    """1 rank x 4 accumulation steps and 2 ranks x 2 see the same 16 samples per step: same loss and norm."""
    common = [*TINY, "max_steps=3", "logging_steps=1", "save_strategy=no", "per_device_train_batch_size=4"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    check_ok(run_deepspeed([*common, f"output_dir={one}", "gradient_accumulation_steps=4"], nproc=1))
    check_ok(run_deepspeed([*common, f"output_dir={two}", "gradient_accumulation_steps=2"], nproc=2))
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def adam_states(ckpt: Path) -> list[dict[str, torch.Tensor]]:
    """Each rank's Adam state in a ZeRO-1/2 checkpoint (the fp32 state of rank r's slice of the flat
    parameters): exp_avg, exp_avg_sq and step, the groups concatenated."""
    states = []
    for rank in range(2):
        (path,) = ckpt.glob(f"global_step*/*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        groups = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        per_group = list(groups["base_optimizer_state"]["state"].values())
        states.append({key: torch.cat([g[key].flatten() for g in per_group]) for key in per_group[0]})
    return states


def test_one_micro_batch_gives_the_gradient_of_four_accumulated(tmp_path: Path) -> None:
    """The loss is normalized by the supervised tokens of the whole optimizer step: 2 ranks x 8 samples in one
    micro-batch each (one packed row) give the gradient of 2 ranks x 4 accumulated micro-batches of 2."""
    common = [*TINY, "max_steps=1", "save_steps=1", "logging_steps=1", "learning_rate=0.0", "warmup_steps=0",
              "max_grad_norm=0.0"]
    one, four = tmp_path / "one", tmp_path / "four"
    check_ok(run_deepspeed([*common, f"output_dir={one}", "per_device_train_batch_size=8",
                            "gradient_accumulation_steps=1"]))
    check_ok(run_deepspeed([*common, f"output_dir={four}", "per_device_train_batch_size=2",
                            "gradient_accumulation_steps=4"]))
    # With beta1 0.9 and no clipping, the first moment after step 1 is exactly 0.1 x the gradient.
    for rank_one, rank_four in zip(adam_states(one / "checkpoint-000001"), adam_states(four / "checkpoint-000001"),
                                   strict=True):
        a, b = rank_one["exp_avg"], rank_four["exp_avg"]
        assert a.abs().max() > 0
        assert torch.linalg.vector_norm(a - b) <= 1e-6 * torch.linalg.vector_norm(b)


def assert_continues_exactly(resumed: Path, reference: Path, after_step: int = 20) -> None:
    """Every metric of the steps after `after_step` up to 80, and the final weights, are the reference's bit for bit.

    DeepSpeed's CPU Adam once drifted from some 15 steps after a resume on, by 1e-7 relative: hence the long
    runs, and a failure names the first step that differs and the largest relative difference.
    """
    after_resume = range(after_step + 1, 81)
    # A run resumed in its own folder appends, so a later line wins (metrics_by_step).
    mine, theirs = ({s: m for s, m in metrics_by_step(run).items() if s in after_resume}
                    for run in (resumed, reference))
    assert sorted(mine) == sorted(theirs) == list(after_resume)
    differ = [(abs(mine[s][k] / v - 1), s, k) for s in after_resume for k, v in theirs[s].items() if mine[s][k] != v]
    worst = max(differ, default=None)
    assert not differ, (
        f"{len({s for _, s, _ in differ})} of {len(after_resume)} steps differ, the first at step {differ[0][1]}; "
        f"largest relative difference {worst[0]:.3g} ({worst[2]} at step {worst[1]})"
    )
    assert_same_weights(module_weights(resumed / "checkpoint-000080"), module_weights(reference / "checkpoint-000080"))
    # The optimizer state (PyTorch's AdamW: moments and step count) went through the checkpoint bit for bit.
    for mine_rank, theirs_rank in zip(adam_states(resumed / "checkpoint-000080"),
                                      adam_states(reference / "checkpoint-000080"), strict=True):
        assert mine_rank.keys() == theirs_rank.keys() == {"exp_avg", "exp_avg_sq", "step"}
        assert all(torch.equal(mine_rank[k], theirs_rank[k]) for k in mine_rank)


def test_resumed_run_matches_the_uninterrupted_one(tmp_path: Path, run_80: Path) -> None:
    """A clean resume from checkpoint 20 into another folder continues exactly, 60 steps on."""
    ckpt = run_80 / "checkpoint-000020"
    check_ok(run_deepspeed([*RESUME_RUN, f"output_dir={tmp_path}", f"resume_from_checkpoint={ckpt}"]))
    assert_continues_exactly(tmp_path, run_80)


def test_killed_run_resumes_exactly(tmp_path: Path, run_80: Path) -> None:
    """SIGKILL one rank right after checkpoint 20; resumed in its folder, the run continues exactly, 60 steps on."""
    run = tmp_path / "run"
    killed = run_deepspeed([*RESUME_RUN, f"output_dir={run}"], script=FAULT_WORKER, FAULT_KILL_AFTER_SAVE_STEP="20")
    assert killed.returncode != 0
    assert resolve_checkpoint("latest", run).name == "checkpoint-000020"
    assert not (run / "checkpoint-000040").exists()

    resumed = check_ok(run_deepspeed([*RESUME_RUN, f"output_dir={run}", "--resume_from_checkpoint"]))
    assert "resumed from" in resumed.stdout
    assert_continues_exactly(run, run_80)


def test_overwrite_output_dir_replaces_an_earlier_run_and_nothing_else(zero2_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(zero2_run, tmp_path / "run"))
    (run / "notes.txt").write_text("the user's own file")
    result = check_ok(run_deepspeed([*TINY, f"output_dir={run}", "max_steps=2", "save_steps=2", "logging_steps=1",
                                     "overwrite_output_dir=true"]))
    assert "overwrite_output_dir: removed the earlier run's checkpoint-000004, checkpoint-000008" in result.stdout
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000002"]
    assert sorted(step_losses(run)) == [1, 2]
    assert (run / "notes.txt").read_text() == "the user's own file"


def test_resume_refuses_other_data(zero2_run: Path, tmp_path: Path) -> None:
    """Other samples (here cut at another length) are other data; another number of ranks is not (test_reshard.py)."""
    ckpt = zero2_run / "checkpoint-000004"
    other_data = run_deepspeed(
        [*TINY_RUN, f"output_dir={tmp_path / 'a'}", f"resume_from_checkpoint={ckpt}", "max_length=32"]
    )
    assert other_data.returncode != 0
    assert "the training data or its order differs from the checkpoint's" in other_data.stdout


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    result = run_deepspeed([*TINY_RUN, f"output_dir={tmp_path}", "--resume_from_checkpoint"])
    assert result.returncode == 2
    assert "cannot resume ('resume_from_checkpoint'): No usable committed checkpoint in" in result.stdout


def test_changed_learning_rate_on_resume_is_allowed_and_logged(zero2_run: Path, tmp_path: Path) -> None:
    ckpt = zero2_run / "checkpoint-000004"
    result = check_ok(
        run_deepspeed([*TINY_RUN, f"output_dir={tmp_path}", f"resume_from_checkpoint={ckpt}", "learning_rate=1e-3"])
    )
    assert "learning_rate changed on resume: 0.003 -> 0.001" in result.stdout
    assert "changed on resume" not in result.stdout.replace("learning_rate changed on resume", "")
    reference = {r["step"]: r["lr"] for r in read_metrics(zero2_run) if "lr" in r}
    changed = {r["step"]: r["lr"] for r in read_metrics(tmp_path) if "lr" in r}
    assert changed[5] == pytest.approx(reference[5] / 3)


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = check_ok(
        run_deepspeed(
            [*TINY, f"output_dir={run}", "max_steps=5", "save_steps=1", "logging_steps=1", "save_total_limit=10"],
            script=FAULT_WORKER,
            FAULT_NAN_AT_STEPS="3",
        )
    )
    assert "non-finite loss at optimizer step 3" in result.stdout
    before, after, later = (module_weights(run / f"checkpoint-00000{s}") for s in (2, 3, 4))
    assert_same_weights(before, after)
    assert not torch.equal(after["transformer.h.0.mlp.dense_h_to_4h.weight"],
                           later["transformer.h.0.mlp.dense_h_to_4h.weight"])
    records = {r["step"]: r for r in read_metrics(run)}
    assert math.isnan(records[3]["loss"]) and records[3]["skipped_steps"] == 1
    assert math.isfinite(records[4]["loss"]) and records[5]["skipped_steps"] == 1


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_error(tmp_path: Path) -> None:
    result = run_deepspeed(
        [*TINY, f"output_dir={tmp_path}", "max_steps=6", "save_strategy=no", "max_nonfinite_steps=2"],
        script=FAULT_WORKER,
        FAULT_NAN_AT_STEPS="2,3,4",
    )
    assert result.returncode != 0
    assert "2 optimizer steps in a row with a non-finite loss, the last at step 3" in result.stdout


def test_two_nodes_on_loopback_match_one_node(tmp_path: Path, zero2_run: Path) -> None:
    """Two torchrun agents (--nnodes 2, one rank each) reproduce the 1-node 2-rank run's losses."""
    port = free_port()
    run = tmp_path / "run"
    args = [*TINY_RUN, f"output_dir={run}", "save_strategy=no"]
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(REPO / "trainer_sft.py"), *args],
            cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=900)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    assert step_losses(run) == pytest.approx(step_losses(zero2_run), rel=1e-6)


def test_slurm_environment_is_adopted(tmp_path: Path, zero2_run: Path) -> None:
    """What `srun` gives each task (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, no RANK) is enough to train."""
    port = free_port()
    run = tmp_path / "run"
    env = {k: v for k, v in cpu_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tasks = [
        subprocess.Popen(
            [sys.executable, str(REPO / "trainer_sft.py"), *TINY_RUN, f"output_dir={run}", "save_strategy=no"],
            cwd=REPO, env={**env, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in (0, 1)
    ]
    outputs = [task.communicate(timeout=900)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-4000:]
    assert step_losses(run) == pytest.approx(step_losses(zero2_run), rel=1e-6)


MEMORIZE = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a large animal that lives in the ocean.", "The blue whale lives in the ocean."),
    ("What is 7 plus 5?", "7 plus 5 is 12."),
    ("How do I boil an egg?", "Put the egg in boiling water for ten minutes."),
]


def write_export(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """A minimal export in the real tree schema: one ready, reviewed English tree per pair."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (question, answer) in enumerate(pairs):
            reply = {"message_id": f"a{i}", "parent_id": f"q{i}", "text": answer, "role": "assistant", "lang": "en"}
            prompt = {"message_id": f"q{i}", "text": question, "role": "prompter", "lang": "en",
                      "review_result": True, "replies": [reply]}
            f.write(json.dumps({"message_tree_id": f"q{i}", "tree_state": "ready_for_export", "prompt": prompt}) + "\n")
    return path


def test_tiny_model_memorizes_training_conversations(tmp_path: Path) -> None:
    export = write_export(tmp_path / "memorize.jsonl", MEMORIZE)
    run = tmp_path / "run"
    check_ok(run_deepspeed([
        *TINY, f"output_dir={run}", f"datasets=[{{oasst_export: {{input_file_path: {export}, val_split: 0.0}}}}]",
        "per_device_train_batch_size=2", "num_train_epochs=150", "save_strategy=epoch", "save_total_limit=1",
        "logging_steps=10", "warmup_steps=10",
    ]))
    assert step_losses(run)[150] < 0.05
    # Through the shipped path: export the run, then greedy answers from transformers' pipeline and the
    # exported chat template, as a user of the model would get them.
    exported = tmp_path / "export"
    export = subprocess.run([sys.executable, str(REPO / "export_model.py"), str(run), "--dtype", "fp32",
                             "--output_folder", str(exported)], cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    assert answer(str(exported), [q for q, _ in MEMORIZE]) == [a for _, a in MEMORIZE]


def test_zero3_with_lima_dropout_checkpointing_and_wandb_offline(tmp_path: Path) -> None:
    run = tmp_path / "run"
    check_ok(run_deepspeed([
        *TINY, f"output_dir={run}", "deepspeed_config=configs/zero3_config.json", "max_steps=3", "save_strategy=no",
        "logging_steps=1", "residual_dropout=0.2", "residual_dropout_lima=true", "gradient_checkpointing=true",
        "log_wandb=true", f"log_dir={tmp_path / 'logs'}",
    ], WANDB_MODE="offline"))
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert abs(losses[1] - math.log(VOCAB_ROWS)) < 0.5
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*"))


def test_pretrained_folder_under_zero3_is_partitioned_resized_and_trains(tmp_path: Path) -> None:
    """from_pretrained inside zero.Init, then the embeddings resized for the chat tokens on gathered weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
        bias=False, alibi=False, vocab_size=2023))
    base.save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    check_ok(run_deepspeed([
        *TINY, f"output_dir={run}", "model_config=null", f"model_name={tmp_path / 'base'}",
        "deepspeed_config=configs/zero3_config.json", "max_steps=2", "save_strategy=steps", "save_steps=2",
        "logging_steps=1",
    ]))
    losses = step_losses(run)
    assert abs(losses[1] - math.log(2023)) < 0.5, losses[1]
    saved = json.loads((run / "checkpoint-000002" / "model_config" / "config.json").read_text())
    assert saved["vocab_size"] == VOCAB_ROWS


def test_multi_source_mixture_trains_through_a_short_last_step(tmp_path: Path) -> None:
    """oasst1 + hh-rlhf (half of it each epoch) + dolly: 115 samples per epoch in steps of 28, so the last
    step has 3 samples and rank 1 runs an empty micro-batch; every source is evaluated on its own."""
    run = tmp_path / "run"
    check_ok(run_deepspeed([
        "--configs", "defaults", "tiny-falcon", "oasst-hh-dolly", f"output_dir={run}", "num_train_epochs=1",
        "per_device_train_batch_size=7", "gradient_accumulation_steps=2", "logging_steps=1", "save_strategy=no",
    ]))
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert {k for k in records[-1] if k.startswith("eval/")} == {
        f"eval/{name}/{metric}" for name in ("oasst1", "hh_rlhf", "dolly15k") for metric in ("loss", "accuracy")
    }


def test_zero3_with_cpu_offload_trains_and_saves(tmp_path: Path) -> None:
    """The shipped ZeRO-3 + CPU offload config (DeepSpeed's CPU Adam, JIT-built once) trains and checkpoints."""
    run = tmp_path / "run"
    check_ok(run_deepspeed([
        *TINY, f"output_dir={run}", "deepspeed_config=configs/zero3_offload_config.json", "max_steps=3",
        "logging_steps=1", "save_steps=3",
    ]))
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]
    assert resolve_checkpoint("latest", run).name == "checkpoint-000003"
