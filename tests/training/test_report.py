"""What a run says of its results on the console: the lines at each evaluation, PPO's lines, the summary."""

from __future__ import annotations

import json
from pathlib import Path

from model_training.training.report import eval_lines, rl_line, run_summary


def test_one_line_per_validation_set_with_the_stages_metrics() -> None:
    results = {"eval/oasst_export/loss": 2.35712, "eval/oasst_export/accuracy": 0.58312,
               "eval/hh/loss": 0.61, "eval/hh/accuracy": 0.75, "eval/hh/margin": 0.4213, "eval/hh/logp_chosen": -9.0}
    assert eval_lines(50, results) == ["step 50 validation oasst_export: loss 2.357, accuracy 58.3%",
                                       "step 50 validation hh: loss 0.61, accuracy 75.0%, margin 0.4213"]


def test_a_ppo_line_shows_reward_kl_entropy_and_length() -> None:
    record = {"reward": 0.123456, "kl": 0.0101, "entropy": 7.1, "length": 31.5, "policy_loss": 0.2}
    assert rl_line(4, record) == "step 4: reward 0.1235, KL 0.0101, entropy 7.1, length 31.5 tokens"


def test_a_grpo_line_adds_its_flat_groups_and_has_no_kl_without_a_reference() -> None:
    record = {"reward": 0.5, "entropy": 0.61, "length": 2.04, "flat_groups": 0.25}
    assert rl_line(7, record) == "step 7: reward 0.5, entropy 0.61, length 2.0 tokens, flat groups 25%"


def test_the_summary_names_the_last_metrics_the_best_and_last_checkpoints_and_the_export(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 4, "loss": 3.0, "eval/a/loss": 2.5, "eval/a/accuracy": 0.4},
               {"step": 8, "loss": 2.0, "eval/a/loss": 2.75, "eval/a/accuracy": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("checkpoint-000004", "checkpoint-000008", ".staging-checkpoint-000012"):
        (run / name).mkdir()
    (run / "training_curves.png").write_bytes(b"png")
    assert run_summary(run, 8, 75.4, 12000, 60.0) == [
        f"done: 8 steps in 1 min 15 s, 200 tokens/s while training; run folder {run}",
        "last step 8: loss 2",
        "last validation (step 8) a: loss 2.75, accuracy 50.0%",
        f"checkpoints: last {run}/checkpoint-000008, best (validation loss) {run}/checkpoint-000004",
        f"plot: {run}/training_curves.png",
        f"next, export it: python export_model.py {run} --output_folder {run}-export",
    ]


def test_a_ppo_summary_shows_reward_and_kl_and_no_checkpoint_without_one(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "reward": 0.5, "kl": 0.02, "length": 12.0}) + "\n")
    (tmp_path / "rollout_samples.jsonl").write_text("{}\n")
    assert run_summary(tmp_path, 2, 5.0, 100, 2.0) == [
        f"done: 2 steps in 5.0 s, 50 tokens/s while training; run folder {tmp_path}",
        "last step 2: reward 0.5, KL 0.02, length 12",
        f"samples: {tmp_path}/rollout_samples.jsonl",
    ]


def test_a_run_without_metrics_still_says_its_steps_time_and_folder(tmp_path: Path) -> None:
    assert run_summary(tmp_path, 3, 4.0, 0, 1.0) == [
        f"done: 3 steps in 4.0 s, 0 tokens/s while training; run folder {tmp_path}"]
