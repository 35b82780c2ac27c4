"""trainer_rm.py and trainer_dpo.py end to end: 2 DeepSpeed ranks on the CPU, the tiny Falcon, a planted preference
(a marker word in the better reply, nothing else to tell the replies apart), then export.

Each module fixture trains 24 steps of 8 groups with checkpoints at 12 and 24; resume tests continue from 12."""

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
    assert_same_weights,
    check_ok,
    cpu_env,
    read_metrics,
    run_deepspeed,
    run_torchrun,
    step_losses,
    write_planted_preferences,
)
from test_train_e2e import module_weights

from model_training.training.checkpoint import resolve_checkpoint

pytestmark = pytest.mark.slow

TIMINGS = ("tokens_per_s", "data_time")


def planted_run(stage: str, data: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [
        "--configs", f"defaults-{stage}", "tiny-falcon",
        f"datasets=[{{preference_jsonl: {{input_file_path: {data}, val_split: 0.2}}}}]",
        "max_steps=24", "save_steps=12", "eval_steps=12", "logging_steps=1", "save_total_limit=null",
        "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "learning_rate=3e-3",
        f"output_dir={output_dir}", *overrides,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_planted_preferences(tmp_path_factory.mktemp("planted") / "planted.jsonl", 240)


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory: pytest.TempPathFactory, planted: Path) -> Path:
    run = tmp_path_factory.mktemp("rm") / "run"
    check_ok(run_deepspeed(planted_run("rm", planted, run), script=REPO / "trainer_rm.py"))
    return run


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, planted: Path) -> Path:
    run = tmp_path_factory.mktemp("dpo") / "run"
    check_ok(run_deepspeed(planted_run("dpo", planted, run), script=REPO / "trainer_dpo.py"))
    return run


def evaluations(run: Path) -> list[dict]:
    return [{k.split("/")[-1]: v for k, v in r.items() if k.startswith("eval/")} for r in read_metrics(run)
            if any(k.startswith("eval/") for k in r)]


def assert_continues_exactly(resumed: Path, reference: Path) -> None:
    """Steps 13-24's metrics (but timings) and the final weights are the uninterrupted run's, bit for bit."""
    def after(run: Path) -> dict[int, dict]:
        return {r["step"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in read_metrics(run)
                if r["step"] > 12}

    assert after(resumed) == after(reference)
    assert sorted(after(resumed)) == list(range(13, 25))
    assert_same_weights(module_weights(resumed / "checkpoint-000024"), module_weights(reference / "checkpoint-000024"))


def export(checkpoint: Path, folder: Path) -> Path:
    result = subprocess.run([sys.executable, str(REPO / "export_model.py"), str(checkpoint), "--dtype", "fp32",
                             "--output_folder", str(folder)], env=cpu_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_reward_model_learns_the_planted_preference(rm_run: Path) -> None:
    losses = step_losses(rm_run)
    assert losses[1] == pytest.approx(math.log(2), abs=0.15)  # a random head: replies score alike
    first, last = evaluations(rm_run)
    assert last["accuracy"] >= 0.9
    assert last["margin"] > first["margin"] > 0
    assert last["loss"] < 0.3


def test_reward_model_exports_as_a_sequence_classifier_that_scores_through_the_chat_template(
    rm_run: Path, planted: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from model_training.config import DpoConfig
    from model_training.data.preferences import format_comparison
    from model_training.data.records import Comparison, Message
    from model_training.models.packed_attention import enable_packed_attention
    from model_training.models.reward_head import enable_token_scores
    from model_training.training.preference import PreferenceSpec

    folder = export(rm_run, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["FalconForSequenceClassification"] and len(config["id2label"]) == 1
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    # As the trainer builds it: a score per token, each sequence of a packed row attending only to itself.
    trained = enable_token_scores(AutoModelForSequenceClassification.from_pretrained(folder).eval())
    enable_packed_attention(trained)
    spec = PreferenceSpec("rm", True, tokenizer.pad_token_id, DpoConfig())

    records = [json.loads(line) for line in planted.read_text().splitlines()[:20]]
    right = 0
    for record in records:
        scores = []
        for reply in (record["chosen"], record["rejected"]):
            chat = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": reply}]
            ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                scores.append(model(**ids).logits.item())
        right += scores[0] > scores[1]
        # The score training computes for the same comparison (packed row, per-token scores) is the export's.
        group = format_comparison(Comparison((Message("prompter", record["prompt"], "p"),),
                                             (record["chosen"], record["rejected"])), tokenizer, "openassistant")
        inputs, targets = spec.device_batch([group], torch.device("cpu"))
        with torch.no_grad():
            ours = trained(**inputs).reshape(-1)[targets.positions]
        assert ours.tolist() == pytest.approx(scores, abs=1e-5)
    assert right >= 18


def test_reward_model_resumes_exactly(rm_run: Path, planted: Path, tmp_path: Path) -> None:
    ckpt = rm_run / "checkpoint-000012"
    check_ok(run_deepspeed([*planted_run("rm", planted, tmp_path), f"resume_from_checkpoint={ckpt}"],
                           script=REPO / "trainer_rm.py"))
    assert_continues_exactly(tmp_path, rm_run)


def test_reward_model_under_zero3_agrees_with_zero2(rm_run: Path, planted: Path, tmp_path: Path) -> None:
    """Both start from the same weights, a reward model folder (ZeRO-3 initializes a model from a config
    partitioned, with other random draws), and train 3 steps alike."""
    start = export(rm_run / "checkpoint-000012", tmp_path / "start")
    losses = {}
    for stage in (2, 3):
        run = tmp_path / f"zero{stage}"
        check_ok(run_deepspeed(planted_run("rm", planted, run, f"model_name={start}", "model_config=null",
                                           "tokenizer_name=null", "max_steps=3", "save_strategy=no",
                                           f"deepspeed_config=configs/zero{stage if stage == 3 else ''}_config.json"),
                               script=REPO / "trainer_rm.py"))
        losses[stage] = step_losses(run)
    assert sorted(losses[3]) == [1, 2, 3]
    assert list(losses[3].values()) == pytest.approx(list(losses[2].values()), rel=1e-5)


@pytest.mark.heavy
def test_killed_reward_model_run_resumes_exactly(rm_run: Path, planted: Path, tmp_path: Path) -> None:
    """SIGKILL one rank right after checkpoint 12; resumed in its folder, the run continues exactly."""
    args = planted_run("rm", planted, tmp_path)
    killed = run_deepspeed(args, script=FAULT_WORKER, FAULT_STAGE="rm", FAULT_KILL_AFTER_SAVE_STEP="12")
    assert killed.returncode != 0
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-000012"
    check_ok(run_deepspeed([*args, "--resume_from_checkpoint"], script=REPO / "trainer_rm.py"))
    assert_continues_exactly(tmp_path, rm_run)


def test_a_comparison_with_one_reply_stops_the_run_with_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}\n'
                    '{"prompt": "Hey", "chosen": "Hello!"}\n')
    result = run_torchrun(planted_run("rm", data, tmp_path / "run"), nproc=1, script=REPO / "trainer_rm.py")
    assert result.returncode == 2
    assert f"error: {data}, line 2: missing field 'rejected'" in result.stdout
    assert not (tmp_path / "run").exists()


def test_dpo_starts_at_its_reference_and_learns_the_planted_preference(dpo_run: Path) -> None:
    losses = step_losses(dpo_run)
    # Step 1's policy is its reference: every margin is 0 and the loss -log sigmoid(0) = log 2.
    assert losses[1] == pytest.approx(math.log(2), abs=1e-4)
    first, last = evaluations(dpo_run)
    assert last["margin"] > first["margin"] > 0
    assert last["accuracy"] >= 0.9
    assert last["reward_chosen"] > last["reward_rejected"]
    assert {"logp_chosen", "logp_rejected"} <= last.keys()


def test_dpo_resumes_exactly_with_the_references_its_checkpoint_kept(dpo_run: Path, planted: Path,
                                                                     tmp_path: Path) -> None:
    ckpt = dpo_run / "checkpoint-000012"
    assert (ckpt / "reference_logps.pt").is_file()
    result = check_ok(run_deepspeed([*planted_run("dpo", planted, tmp_path), f"resume_from_checkpoint={ckpt}"],
                                    script=REPO / "trainer_dpo.py"))
    assert "startup: reference log-probabilities" in result.stdout and "(from the checkpoint)" in result.stdout
    assert_continues_exactly(tmp_path, dpo_run)


def test_dpo_exports_a_chat_model_as_sft_does(dpo_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = export(dpo_run, tmp_path / "export")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["FalconForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say something about the river."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
