"""trainer_rl.py end to end: 2 DeepSpeed ranks on the CPU, tiny Falcons, a planted behaviour.

The chain a user runs: an SFT policy on replies of which half hold a marker word (PLANTED_MARKER), a reward model
trained from that policy on pairs where the reply with the marker is the better one, then PPO from the SFT run folder
against the reward model's run folder (both exported once into the PPO run, training/start.py). The PPO run takes 12
steps of 32 rollouts of up to 32 tokens with checkpoints at 6 and 12; the resume test continues from 6. Its KL
coefficient is 0.2: a tiny reward model trained on 24 steps of word lists also rates some gibberish highly, which a
policy at the recipe's 0.01 drifts into within a few more steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    FAULT_WORKER,
    PLANTED_MARKER,
    REPO,
    assert_same_weights,
    check_ok,
    metrics_by_step,
    read_metrics,
    run_deepspeed,
    run_torchrun,
    write_planted_chats,
    write_planted_preferences,
)
from test_preference_e2e import export
from test_train_e2e import module_weights

from model_training.checkpoints.read import resolve_checkpoint

pytestmark = pytest.mark.slow
RL = REPO / "trainer_rl.py"


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_planted_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl", 400)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, chats: Path) -> Path:
    run = tmp_path_factory.mktemp("sft") / "run"
    check_ok(run_deepspeed(["--configs", "defaults", "tiny-falcon", chat_data(chats), "max_steps=150",
                            "save_steps=150", "eval_steps=150", f"output_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory: pytest.TempPathFactory, sft_run: Path) -> Path:
    """A reward model from the SFT policy, on pairs whose better reply holds the marker."""
    prefs = write_planted_preferences(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", 240)
    run = tmp_path_factory.mktemp("rm") / "run"
    check_ok(run_deepspeed([
        "--configs", "defaults-rm", "tiny-falcon",
        f"datasets=[{{preference_jsonl: {{input_file_path: {prefs}, val_split: 0.2}}}}]",
        f"model_name={sft_run}", "model_config=null", "tokenizer_name=null", "max_steps=24", "save_steps=24",
        "eval_steps=24", "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "learning_rate=3e-3",
        f"output_dir={run}",
    ], script=REPO / "trainer_rm.py"))  # fmt: skip
    return run


def chat_data(chats: Path) -> str:
    return f"datasets=[{{chat_jsonl: {{input_file_path: {chats}, val_split: 0.1}}}}]"


def ppo_args(chats: Path, sft_run: Path, rm_run: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [
        "--configs", "defaults", "tiny-falcon", "tiny-ppo", chat_data(chats), f"model_name={sft_run}",
        f"ppo.reward_model={rm_run}", "max_steps=12", "save_steps=6", "learning_rate=5e-4", "ppo.kl_coef=0.2",
        "per_device_train_batch_size=8", "ppo.num_rollouts=32", "ppo.rollout_batch_size=16", "ppo.max_new_tokens=32",
        "ppo.ppo_steps_per_epoch=2", "ppo.samples_to_log=16", "save_total_limit=null", f"output_dir={output_dir}",
        *overrides,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory: pytest.TempPathFactory, chats: Path, sft_run: Path, rm_run: Path) -> Path:
    run = tmp_path_factory.mktemp("ppo") / "run"
    check_ok(run_deepspeed(ppo_args(chats, sft_run, rm_run, run), script=RL))
    return run


def marker_share(run: Path, steps: range) -> float:
    """The share of rank 0's logged continuations of `steps` that say the marker."""
    rows = [json.loads(line) for line in (run / "rollout_samples.jsonl").read_text().splitlines()]
    said = [PLANTED_MARKER in row["continuation"] for row in rows if row["step"] in steps]
    assert len(said) == 16 * len(steps)
    return sum(said) / len(said)


def test_ppo_raises_the_reward_with_a_bounded_kl_and_the_policy_says_the_marker(ppo_run: Path) -> None:
    records = {r["step"]: r for r in read_metrics(ppo_run)}
    assert sorted(records) == list(range(1, 13))
    assert records[1]["kl"] == 0.0  # the first rollouts come from the reference's own weights
    first = sum(records[s]["reward"] for s in range(1, 5)) / 4
    last = sum(records[s]["reward"] for s in range(9, 13)) / 4
    assert last > first + 1.0, (first, last)
    assert max(abs(r["kl"]) for r in records.values()) < 5.0
    before, after = marker_share(ppo_run, range(1, 5)), marker_share(ppo_run, range(9, 13))
    assert after >= 0.45 and after >= before + 0.15, (before, after)
    for record in records.values():
        assert {"policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "entropy", "length", "lr",
                "value_lr", "rollout_tokens_per_s", "train_tokens_per_s"} <= record.keys()
        assert 0 < record["length"] <= 32 and record["entropy"] > 0
    assert any(r["policy_clipfrac"] > 0 for r in records.values())  # two steps per pass: the second one clips


def test_the_policy_exports_as_a_chat_model_and_the_value_model_is_saved_beside_it(ppo_run: Path,
                                                                                   tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoint = ppo_run / "checkpoint-000012"
    assert (checkpoint / "value" / "global_step12").is_dir() and (checkpoint / "value" / "model_config").is_dir()
    exported = load_file(export(checkpoint, tmp_path / "export") / "model.safetensors")
    trained = module_weights(checkpoint)
    assert exported.keys() <= trained.keys()
    assert_same_weights({k: v for k, v in trained.items() if k in exported}, exported)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(model).__name__ == "FalconForCausalLM"


def test_killed_ppo_run_resumes_exactly(ppo_run: Path, chats: Path, sft_run: Path, rm_run: Path,
                                        tmp_path: Path) -> None:
    """SIGKILL one rank right after checkpoint 6; resumed in its folder, steps 7-12 and both models' final weights are
    the uninterrupted run's, bit for bit."""
    args = ppo_args(chats, sft_run, rm_run, tmp_path)
    killed = run_deepspeed(args, script=FAULT_WORKER, FAULT_STAGE="rl", FAULT_KILL_AFTER_SAVE_STEP="6")
    assert killed.returncode != 0
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-000006"
    check_ok(run_deepspeed([*args, "--resume_from_checkpoint"], script=RL))

    def after(run: Path) -> dict[int, dict]:
        return {step: m for step, m in metrics_by_step(run).items() if step > 6}

    timings = ("rollout_tokens_per_s", "train_tokens_per_s")
    resumed, reference = after(tmp_path), after(ppo_run)
    assert sorted(resumed) == list(range(7, 13))
    for step, metrics in reference.items():
        assert {k: v for k, v in resumed[step].items() if k not in timings} == {
            k: v for k, v in metrics.items() if k not in timings}
    for sub in ("", "value"):
        assert_same_weights(module_weights(tmp_path / "checkpoint-000012" / sub),
                            module_weights(ppo_run / "checkpoint-000012" / sub))


def test_zero3_with_partitioned_frozen_models_runs_the_same_first_step(ppo_run: Path, chats: Path, sft_run: Path,
                                                                         rm_run: Path, tmp_path: Path) -> None:
    check_ok(run_deepspeed(ppo_args(chats, sft_run, rm_run, tmp_path, "max_steps=2", "save_steps=2",
                                    "deepspeed_config=configs/zero3_config.json", "ppo.frozen_zero3=true"), script=RL))
    zero3, zero2 = read_metrics(tmp_path), read_metrics(ppo_run)
    assert [r["step"] for r in zero3] == [1, 2]
    for key in ("reward", "length", "entropy", "value_loss"):
        assert zero3[0][key] == pytest.approx(zero2[0][key], rel=1e-4), key
    assert (tmp_path / "checkpoint-000002" / "value" / "global_step2").is_dir()


def test_a_prompt_longer_than_the_limit_is_refused_with_its_source(chats: Path, sft_run: Path, rm_run: Path,
                                                                   tmp_path: Path) -> None:
    result = run_torchrun(ppo_args(chats, sft_run, rm_run, tmp_path / "run", "ppo.max_prompt_length=8"), nproc=1,
                          script=RL)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "error: the prompt chat_jsonl #" in result.stdout
    assert "longer than 'ppo.max_prompt_length' (8)" in result.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_module_weights_of_the_start_and_the_policy_differ(ppo_run: Path) -> None:
    """PPO trained the policy: its weights moved away from the SFT export it started from."""
    from safetensors.torch import load_file

    start = load_file(ppo_run / "start_model" / "model.safetensors")
    trained = module_weights(ppo_run / "checkpoint-000012")
    assert any(not torch.equal(trained[name], tensor) for name, tensor in start.items() if name in trained)


def test_a_finished_ppo_run_draws_its_own_curves(ppo_run: Path) -> None:
    """At its end rank 0 draws training_curves.png from PPO's own metrics (reward, KL, ..., no panel without data)."""
    from model_training.training.plot import curves, read_records, stage_of

    records = read_records(ppo_run / "metrics.jsonl")
    assert stage_of(records) == "rl"
    assert all(panel.series[0].steps.size for panel in curves(records)), "a panel without data"
    png = ppo_run / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_mtime >= (ppo_run / "metrics.jsonl").stat().st_mtime
