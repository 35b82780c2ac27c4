"""trainer_rl.py with rl_algorithm grpo end to end: 2 DeepSpeed ranks on the CPU, a tiny Falcon, a planted task.

The chain: an SFT policy on the bundled arithmetic prompts (data/arithmetic_sample.jsonl), trained only until it
answers about half of them right (SFT_STEPS), then GRPO from that run folder with the exact-match reward
(rewards:exact_answer) and the KL term to the reference, for GRPO_STEPS steps of 16 prompts x 8 continuations, two
optimizer steps each. The run keeps checkpoints at every SAVE_STEPS; the resume test continues from the first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAULT_WORKER, REPO, assert_same_weights, check_ok, metrics_by_step, read_metrics, run_deepspeed
from test_preference_e2e import export
from test_train_e2e import module_weights

from model_training.checkpoints.read import resolve_checkpoint
from model_training.training.plot import read_records, stage_of

pytestmark = pytest.mark.slow
RL = REPO / "trainer_rl.py"
PROMPTS = REPO / "data" / "arithmetic_sample.jsonl"
SFT_STEPS, GRPO_STEPS, SAVE_STEPS = 100, 30, 15
EXACT = "model_training.training.rewards:exact_answer"
TIMINGS = ("rollout_tokens_per_s", "train_tokens_per_s")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy that answers the arithmetic prompts as chats, trained on their right answers."""
    folder = tmp_path_factory.mktemp("sft")
    chats = folder / "chats.jsonl"
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    chats.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": row["prompt"]},
                                 {"role": "assistant", "content": str(row["answer"])}]}) + "\n"
        for row in rows * 16))
    run = folder / "run"
    check_ok(run_deepspeed(["--configs", "defaults", "tiny-falcon", f"datasets=[{{chat_jsonl: {{input_file_path: "
                            f"{chats}, val_split: 0.1}}}}]", f"max_steps={SFT_STEPS}", f"save_steps={SFT_STEPS}",
                            f"eval_steps={SFT_STEPS}", f"output_dir={run}"]))
    return run


def grpo_args(sft_run: Path, output_dir: Path, *overrides: str, rewards: str = f"[{{function: '{EXACT}'}}]",
              ) -> list[str]:
    return [
        "--configs", "defaults-grpo", "tiny-falcon", "tiny-grpo", f"model_name={sft_run}", f"max_steps={GRPO_STEPS}",
        f"save_steps={SAVE_STEPS}", "logging_steps=1", "learning_rate=2e-3", "warmup_steps=4", "ppo.num_rollouts=128",
        "ppo.ppo_steps_per_epoch=2", "per_device_train_batch_size=16", "grpo.group_size=8", "ppo.samples_to_log=8",
        "save_total_limit=null",
        f"grpo.reward_functions={rewards}", f"output_dir={output_dir}", *overrides,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory: pytest.TempPathFactory, sft_run: Path) -> Path:
    run = tmp_path_factory.mktemp("grpo") / "run"
    check_ok(run_deepspeed(grpo_args(sft_run, run), script=RL))
    return run


def mean(records: dict[int, dict], key: str, steps: range) -> float:
    return sum(records[s][key] for s in steps) / len(steps)


def rise(run: Path) -> tuple[float, float]:
    """The exact-match share of the first and of the last five steps."""
    records = {r["step"]: r for r in read_metrics(run)}
    last = max(records)
    return (mean(records, "reward/exact_answer", range(1, 6)),
            mean(records, "reward/exact_answer", range(last - 4, last + 1)))


def test_grpo_raises_the_exact_match_reward_with_a_bounded_kl(grpo_run: Path) -> None:
    records = {r["step"]: r for r in read_metrics(grpo_run)}
    assert sorted(records) == list(range(1, GRPO_STEPS + 1))
    assert records[1]["kl"] == 0.0  # the first rollouts come from the reference's own weights
    first, last = rise(grpo_run)
    assert last > first + 0.12, (first, last)
    assert max(r["kl"] for r in records.values()) < 1.0
    assert records[GRPO_STEPS]["flat_groups"] > records[1]["flat_groups"]  # groups answered right by all of them
    for record in records.values():
        assert {"reward", "reward/exact_answer", "reward_std", "flat_groups", "kl", "entropy", "length",
                "policy_loss", "clip_low_frac", "clip_high_frac", "lr"} <= record.keys()
        assert "value_lr" not in record and "value_loss" not in record
        assert record["reward"] == record["reward/exact_answer"]  # one function, weight 1
        assert 0.0 <= record["flat_groups"] <= 1.0 and record["entropy"] > 0
    assert stage_of(read_records(grpo_run / "metrics.jsonl")) == "grpo" and (grpo_run / "training_curves.png").is_file()
    samples = [json.loads(line) for line in (grpo_run / "rollout_samples.jsonl").read_text().splitlines()]
    assert {s["score"] for s in samples} <= {0.0, 1.0} and len(samples) == 8 * GRPO_STEPS


def test_a_constant_reward_teaches_nothing(sft_run: Path, tmp_path: Path) -> None:
    """The twin of the test above with the reward replaced by a constant (exact match only watched, weight 0): every
    group is flat, every advantage 0, and the exact-match share does not rise: the test above fails on this run.

    (The policy still drifts a little: the KL term's gradient is 0 only where the update's log-probabilities equal
    the rollout's, and a micro-batch, cut to its own width, computes them with rounding-level differences, which Adam
    scales up to steps of the learning rate's size. The KL it measures shows that drift.)"""
    rewards = f"[{{function: 'tests.training.grpo_rewards:constant'}}, {{function: '{EXACT}', weight: 0}}]"
    check_ok(run_deepspeed(grpo_args(sft_run, tmp_path, "max_steps=10", "save_strategy=no", rewards=rewards),
                           script=RL))
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(records) == list(range(1, 11))
    assert all(r["flat_groups"] == 1.0 and r["reward"] == 1.0 and r["reward_std"] == 0.0 for r in records.values())
    first, last = rise(tmp_path)
    assert last < first + 0.12, (first, last)


def test_the_policy_exports_and_answers_the_prompts(grpo_run: Path, tmp_path: Path) -> None:
    """The last checkpoint exports as a chat model (no value model beside it) whose greedy answers are right more
    often than the SFT policy's sampled ones were at step 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = grpo_run / f"checkpoint-{GRPO_STEPS:06d}"
    assert not (checkpoint / "value").exists()
    folder = export(checkpoint, tmp_path / "export")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    right = 0
    for row in rows:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        right += answer.strip() == str(row["answer"])
    first = {r["step"]: r for r in read_metrics(grpo_run)}[1]["reward/exact_answer"]
    assert right / len(rows) > first, (right, first)


def test_killed_grpo_run_resumes_exactly(grpo_run: Path, sft_run: Path, tmp_path: Path) -> None:
    """SIGKILL one rank right after the first checkpoint; resumed in its folder, the later steps and the final weights
    are the uninterrupted run's, bit for bit."""
    args = grpo_args(sft_run, tmp_path)
    killed = run_deepspeed(args, script=FAULT_WORKER, FAULT_STAGE="rl", FAULT_KILL_AFTER_SAVE_STEP=str(SAVE_STEPS))
    assert killed.returncode != 0
    assert resolve_checkpoint("latest", tmp_path).name == f"checkpoint-{SAVE_STEPS:06d}"
    check_ok(run_deepspeed([*args, "--resume_from_checkpoint"], script=RL))

    def after(run: Path) -> dict[int, dict]:
        return {step: {k: v for k, v in m.items() if k not in TIMINGS}
                for step, m in metrics_by_step(run).items() if step > SAVE_STEPS}

    resumed, reference = after(tmp_path), after(grpo_run)
    assert sorted(resumed) == list(range(SAVE_STEPS + 1, GRPO_STEPS + 1))
    assert resumed == reference
    final = f"checkpoint-{GRPO_STEPS:06d}"
    assert_same_weights(module_weights(tmp_path / final), module_weights(grpo_run / final))
    assert not (tmp_path / final / "value").exists()


def test_zero3_runs_the_same_first_steps(grpo_run: Path, sft_run: Path, tmp_path: Path) -> None:
    check_ok(run_deepspeed(grpo_args(sft_run, tmp_path, "max_steps=2", "save_steps=2",
                                     "deepspeed_config=configs/zero3_config.json", "ppo.frozen_zero3=true"), script=RL))
    zero3, zero2 = read_metrics(tmp_path), read_metrics(grpo_run)
    assert [r["step"] for r in zero3] == [1, 2]
    for key in ("reward", "length", "entropy", "policy_loss", "kl"):
        assert zero3[0][key] == pytest.approx(zero2[0][key], rel=1e-4, abs=1e-7), key


def test_a_failing_reward_function_stops_before_the_update_with_one_line(sft_run: Path, tmp_path: Path) -> None:
    rewards = "[{function: 'tests.training.grpo_rewards:fails_on_four'}]"
    result = run_deepspeed(grpo_args(sft_run, tmp_path, rewards=rewards), script=RL)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "reward function tests.training.grpo_rewards:fails_on_four failed on arithmetic_sample.jsonl line" in (
        result.stdout)
    assert "KeyError: 'no rule for 4'; the step is not applied" in result.stdout
    assert "Traceback" not in result.stdout
    assert not list(tmp_path.glob("checkpoint-*"))
