"""trainer_rm.py and trainer_dpo.py end to end: 2 DeepSpeed ranks on the CPU, the tiny Falcon, a planted preference
(a marker word in the better reply, nothing else to tell the replies apart), then export.

Each module fixture trains 24 steps of 8 groups with checkpoints at 12 and 24; resume tests continue from 12. The
reward model starts from a saved folder (random weights), so that a ZeRO-3 run starts from the same weights: ZeRO-3
initializes a model built from a config partitioned, with other random draws."""

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
    VOCAB_ROWS,
    assert_same_weights,
    check_ok,
    cpu_env,
    metrics_by_step,
    read_metrics,
    run_deepspeed,
    run_torchrun,
    step_losses,
    write_planted_preferences,
)
from test_train_e2e import module_weights

from model_training.checkpoints.read import resolve_checkpoint

pytestmark = pytest.mark.slow


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
def rm_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Falcon as a sequence classifier with one score, random weights, and the chat tokenizer, saved."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from model_training.config import load_config
    from model_training.models.builder import load_tokenizer

    cfg = load_config(["defaults-rm", "tiny-falcon", "preference-sample"], stage="rm")
    tokenizer = load_tokenizer(cfg)
    options = dict(cfg.model_config)
    config = AutoConfig.for_model(options.pop("model_type"), **options, num_labels=1, vocab_size=VOCAB_ROWS,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rm_start") / "model"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rm_args(data: Path, output_dir: Path, start: Path, *overrides: str) -> list[str]:
    return planted_run("rm", data, output_dir, f"model_name={start}", "model_config=null", "tokenizer_name=null",
                       *overrides)


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory: pytest.TempPathFactory, planted: Path, rm_start: Path) -> Path:
    run = tmp_path_factory.mktemp("rm") / "run"
    check_ok(run_deepspeed(rm_args(planted, run, rm_start), script=REPO / "trainer_rm.py"))
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
        return {step: metrics for step, metrics in metrics_by_step(run).items() if step > 12}

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
    assert losses[1] == pytest.approx(math.log(2), abs=0.15)  # a random head: replies score about alike
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
    from model_training.training.preference_loss import PreferenceSpec

    folder = export(rm_run, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["FalconForSequenceClassification"] and len(config["id2label"]) == 1
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    # As the trainer builds it: a score per token, each sequence of a packed row attending only to itself.
    trained = enable_token_scores(AutoModelForSequenceClassification.from_pretrained(folder).eval())
    enable_packed_attention(trained)
    spec = PreferenceSpec(True, True, tokenizer.pad_token_id, DpoConfig())

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


def test_reward_model_under_zero3_agrees_with_zero2(
    rm_run: Path, planted: Path, rm_start: Path, tmp_path: Path
) -> None:
    check_ok(run_deepspeed(rm_args(planted, tmp_path, rm_start, "max_steps=3", "save_strategy=no",
                                   "deepspeed_config=configs/zero3_config.json"), script=REPO / "trainer_rm.py"))
    zero3, zero2 = step_losses(tmp_path), step_losses(rm_run)
    assert sorted(zero3) == [1, 2, 3]
    assert [zero3[s] for s in zero3] == pytest.approx([zero2[s] for s in zero3], rel=1e-5)


def test_killed_reward_model_run_resumes_exactly(rm_run: Path, planted: Path, rm_start: Path, tmp_path: Path) -> None:
    """SIGKILL one rank right after checkpoint 12; resumed in its folder, the run continues exactly."""
    args = rm_args(planted, tmp_path, rm_start)
    killed = run_deepspeed(args, script=FAULT_WORKER, FAULT_STAGE="rm", FAULT_KILL_AFTER_SAVE_STEP="12")
    assert killed.returncode != 0
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-000012"
    check_ok(run_deepspeed([*args, "--resume_from_checkpoint"], script=REPO / "trainer_rm.py"))
    assert_continues_exactly(tmp_path, rm_run)


def test_dpo_starts_at_its_reference_and_learns_the_planted_preference(dpo_run: Path) -> None:
    losses = step_losses(dpo_run)
    # Step 1's policy is its reference: every margin is 0 and the loss -log sigmoid(0) = log 2.
    assert losses[1] == pytest.approx(math.log(2), abs=1e-4)
    first, last = evaluations(dpo_run)
    assert last["margin"] > first["margin"] > 0
    assert last["accuracy"] >= 0.9
    assert last["reward_chosen"] > last["reward_rejected"]
    assert {"logp_chosen", "logp_rejected"} <= last.keys()


def test_dpo_starts_from_an_sft_run_folder_exported_once(zero2_run: Path, planted: Path, tmp_path: Path) -> None:
    """model_name = an SFT run folder: its newest checkpoint is exported into start_model/ and trained from; at
    learning rate 0 the run's weights stay the export's, and a second launch reuses the export."""
    from safetensors.torch import load_file

    from model_training.layout import TORCH_MODEL_STATES

    run = tmp_path / "run"
    args = planted_run("dpo", planted, run, f"model_name={zero2_run}", "model_config=null", "tokenizer_name=null",
                       "max_steps=1", "eval_steps=null", "learning_rate=0.0", "--no-deepspeed")
    check_ok(run_torchrun(args, nproc=1, script=REPO / "trainer_dpo.py"))
    start = run / "start_model"
    assert (start / "source.txt").read_text().splitlines()[0] == str((zero2_run / "checkpoint-000008").resolve())
    assert step_losses(run)[1] == pytest.approx(math.log(2), abs=1e-6)
    (states,) = (run / "checkpoint-000001").rglob(TORCH_MODEL_STATES)
    trained = torch.load(states, weights_only=True)["module"]
    exported = load_file(start / "model.safetensors")
    assert all(torch.equal(trained[name], tensor) for name, tensor in exported.items())

    again = check_ok(run_torchrun([*args, "overwrite_output_dir=true"], nproc=1, script=REPO / "trainer_dpo.py"))
    assert "exported from" in again.stdout and "before" in again.stdout


def test_dpo_resumes_exactly_with_the_references_its_checkpoint_kept(dpo_run: Path, planted: Path,
                                                                     tmp_path: Path) -> None:
    ckpt = dpo_run / "checkpoint-000012"
    assert (ckpt / "reference_logps.pt").is_file()
    result = check_ok(run_deepspeed([*planted_run("dpo", planted, tmp_path), f"resume_from_checkpoint={ckpt}"],
                                    script=REPO / "trainer_dpo.py"))
    assert "startup: reference log-probabilities" in result.stdout and "(from the checkpoint)" in result.stdout
    assert_continues_exactly(tmp_path, dpo_run)


@pytest.fixture(scope="module")
def dpo_export(dpo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(dpo_run, tmp_path_factory.mktemp("dpo_export") / "export")


def test_dpo_exports_a_chat_model_as_sft_does(dpo_export: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert json.loads((dpo_export / "config.json").read_text())["architectures"] == ["FalconForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(dpo_export)
    model = AutoModelForCausalLM.from_pretrained(dpo_export)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say something about the river."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_a_reward_model_starts_from_a_chat_model_export(dpo_export: Path, planted: Path, tmp_path: Path) -> None:
    """The backbone's weights from the export, a new score head, the language-model head dropped; one step at
    learning rate 0 keeps them as loaded (here one process without DeepSpeed)."""
    from safetensors.torch import load_file

    from model_training.layout import TORCH_MODEL_STATES

    run = tmp_path / "run"
    check_ok(run_torchrun(rm_args(planted, run, dpo_export, "max_steps=1", "eval_steps=null", "learning_rate=0.0",
                                  "--no-deepspeed"), nproc=1, script=REPO / "trainer_rm.py"))
    (states,) = (run / "checkpoint-000001").rglob(TORCH_MODEL_STATES)
    trained = torch.load(states, weights_only=True)["module"]
    exported = load_file(dpo_export / "model.safetensors")
    assert trained.keys() - exported.keys() == {"score.weight"}
    assert all(torch.equal(trained[name], tensor) for name, tensor in exported.items() if name in trained)
    assert exported.keys() - trained.keys() <= {"lm_head.weight"}  # tied to the embeddings, if written at all
