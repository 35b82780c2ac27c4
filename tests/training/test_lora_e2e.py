"""LoRA and QLoRA through the real CLIs: 2 CPU ranks on ZeRO-2, checkpoints, exact resume, both exports.

The base is a pretrained folder (a tiny Falcon saved with random weights), as a user's base would be; the
checkpoints must hold only what was trained, and the merged export must equal base + adapter.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, check_ok, cpu_env, run_deepspeed, step_losses
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model_training.config import QuantizationConfig
from model_training.models.lora import dequantized_weight, quantize_linear_layers

pytestmark = pytest.mark.slow

LORA = [
    *TINY, "model_config=null", "peft.type=lora", "peft.r=8", "peft.alpha=16", "peft.dropout=0.0",
    "learning_rate=1e-2", "max_steps=4", "save_steps=2", "logging_steps=1", "eval_steps=2",
]
SCALE = 16 / 8


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Falcon with random weights saved as a Hugging Face folder: a stand-in for tiiuae/falcon-7b."""
    folder = tmp_path_factory.mktemp("base") / "tiny-falcon"
    config = AutoConfig.for_model(
        "falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, bias=False, alibi=False, vocab_size=2023,
    )
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> Path:
    output_dir = tmp_path_factory.mktemp("lora") / "run"
    check_ok(run_deepspeed([
        *LORA, f"model_name={base_dir}", f"output_dir={output_dir}",
        'generate_samples=["What is the capital of France?"]', "generate_val_samples=2", "generate_max_new_tokens=6",
    ]))
    return output_dir


def export(checkpoint: Path, folder: Path, *flags: str) -> Path:
    cmd = [sys.executable, str(REPO / "export_model.py"), str(checkpoint), "--output_folder", str(folder),
           "--dtype", "fp32", *flags]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
    return folder


def load_base(base_dir: Path, rows: int) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.resize_token_embeddings(rows)  # the chat tokens' rows, as training had them
    return base.eval()


def test_checkpoints_hold_only_the_trained_tensors(lora_run: Path) -> None:
    for step in (2, 4):
        module = torch.load(
            lora_run / f"checkpoint-{step:06d}" / f"global_step{step}" / "mp_rank_00_model_states.pt",
            weights_only=False,
        )
        names = set(module["module"])
        assert len(names) == 17 and all(".lora_" in n or "trainable_tokens_delta" in n for n in names), names
        assert module["frozen_param_fragments"] is None
    adapter = json.loads((lora_run / "checkpoint-000004" / "adapter" / "adapter_config.json").read_text())
    # The chat tokens' rows and the padding rows the resize added (2023 -> 2032) train with the adapters.
    assert adapter["r"] == 8 and adapter["trainable_token_indices"] == {"word_embeddings": list(range(2023, 2032))}


def test_losses_fall_and_samples_are_written(lora_run: Path) -> None:
    losses = step_losses(lora_run)
    assert len(losses) == 4 and losses[4] < losses[1]
    rows = [json.loads(line) for line in (lora_run / "samples.jsonl").read_text().splitlines()]
    assert [row["source"] for row in rows] == ["query", "val/oasst_export", "val/oasst_export"]
    assert rows[0]["prompt"] == "<|prompter|>What is the capital of France?<|endoftext|><|assistant|>"
    assert len({row["prompt"] for row in rows}) == 3
    table = (lora_run / "samples.md").read_text().splitlines()
    assert table[0] == "| source | prompt | answer |" and len(table) == 2 + len(rows)


def test_merged_export_is_base_plus_adapter(lora_run: Path, base_dir: Path, tmp_path: Path) -> None:
    adapter_dir = export(lora_run, tmp_path / "adapter")
    merged_dir = export(lora_run, tmp_path / "merged", "--merge_adapter")
    assert sorted(p.name for p in adapter_dir.glob("adapter_*")) == ["adapter_config.json", "adapter_model.safetensors"]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = load_base(base_dir, merged.config.vocab_size)
    adapter = load_file(adapter_dir / "adapter_model.safetensors")

    merged_weights, base_weights = merged.state_dict(), base.state_dict()
    targeted = 0
    for name, weight in merged_weights.items():
        layer = "base_model.model." + name.removesuffix(".weight")
        if f"{layer}.lora_A.weight" in adapter:
            delta = SCALE * adapter[f"{layer}.lora_B.weight"] @ adapter[f"{layer}.lora_A.weight"]
            assert delta.abs().max() > 0  # B starts at zero: training moved it
            torch.testing.assert_close(weight, base_weights[name] + delta, rtol=0, atol=1e-6)
            targeted += 1
        elif name in ("transformer.word_embeddings.weight", "lm_head.weight"):
            # The rows the resize added (chat tokens and padding) come from the adapter; the others are the base's.
            assert torch.equal(weight[:2023], base_weights[name][:2023])
            new_rows = adapter["base_model.model.transformer.word_embeddings.token_adapter.trainable_tokens_delta"]
            assert torch.equal(weight[2023:], new_rows)
        else:
            assert torch.equal(weight, base_weights[name]), name
    assert targeted == 8

    # The adapter folder on the base, through peft's own loader, computes what the merged model computes.
    with_adapter = PeftModel.from_pretrained(load_base(base_dir, merged.config.vocab_size), adapter_dir).eval()
    ids = torch.tensor([tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I boil an egg?"}], add_generation_prompt=True, return_dict=False
    )])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


def test_resume_continues_exactly(lora_run: Path, base_dir: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    check_ok(run_deepspeed([
        *LORA, f"model_name={base_dir}", f"output_dir={resumed}",
        f"resume_from_checkpoint={lora_run / 'checkpoint-000002'}",
    ]))
    assert step_losses(resumed) == {k: v for k, v in step_losses(lora_run).items() if k > 2}
    final = "checkpoint-000004/global_step4/mp_rank_00_model_states.pt"
    first = torch.load(lora_run / final, weights_only=False)["module"]
    second = torch.load(resumed / final, weights_only=False)["module"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_qlora_trains_and_merges_into_the_4bit_base(base_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "qlora"
    qlora = ["quantization.load_in_4bit=true", "quantization.compute_dtype=fp32", "chat_format=human_bot",
             "gradient_checkpointing=true", "max_steps=3", "save_steps=3"]
    check_ok(run_deepspeed([*LORA, f"model_name={base_dir}", f"output_dir={run}", *qlora]))
    losses = step_losses(run)
    assert len(losses) == 3 and losses[3] < losses[1]

    adapter_dir = export(run, tmp_path / "adapter")
    merged_dir = export(run, tmp_path / "merged", "--merge_adapter")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    # human_bot adds no token; the rows padding the vocabulary to a multiple of 16 are trained all the same.
    indices = json.loads((adapter_dir / "adapter_config.json").read_text())["trainable_token_indices"]
    assert merged.config.vocab_size == 2032 and indices == {"word_embeddings": list(range(2023, 2032))}
    # Each targeted weight is the 4-bit round trip of the base's, plus the update: bitsandbytes' quantization
    # is deterministic, so this is the very de-quantized weight the 4-bit layer computed with in training.
    qcfg = QuantizationConfig(load_in_4bit=True, compute_dtype="fp32")
    base_weights = load_base(base_dir, merged.config.vocab_size).state_dict()
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    targeted = 0
    for name, weight in merged.state_dict().items():
        layer = "base_model.model." + name.removesuffix(".weight")
        if f"{layer}.lora_A.weight" in adapter:
            delta = SCALE * adapter[f"{layer}.lora_B.weight"] @ adapter[f"{layer}.lora_A.weight"]
            expected = dequantized_weight(base_weights[name], qcfg) + delta
            torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)
            targeted += 1
    assert targeted == 8
    # The training-time model, the base in 4 bits with the adapter on top, computes x W^T + s (x A^T) B^T with
    # those same de-quantized W; the merged model x (W + s B A)^T. The de-quantization noise is the same on
    # both sides and cancels: they differ only by the fp32 rounding of the reassociated sums (~1e-7 relative
    # over 64-wide products, two layers), so 1e-5 holds with room on any machine.
    four_bit = load_base(base_dir, merged.config.vocab_size)
    quantize_linear_layers(four_bit, qcfg, torch.device("cpu"))
    trained = PeftModel.from_pretrained(four_bit, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False) == "<human>: Hi\n<bot>:"
    ids = torch.tensor([tokenizer("<human>: How do I boil an egg?\n<bot>:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(trained(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("which", "flags", "message"),
    [
        ("full", ["--merge_adapter"], r"--merge_adapter: .* is not a LoRA checkpoint \(it has no adapter/ folder\)"),
        ("lora", ["--merge_adapter", "--base_model", "/nonexistent/base"],
         r"cannot load the base model '/nonexistent/base' to merge into: .*\(pass --base_model\)"),
    ],
)
def test_adapter_export_mistakes_are_one_line(
    which: str, flags: list[str], message: str, zero2_run: Path, lora_run: Path, tmp_path: Path
) -> None:
    source = zero2_run if which == "full" else lora_run
    cmd = [sys.executable, str(REPO / "export_model.py"), str(source), "--output_folder", str(tmp_path / "out"), *flags]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("export_model.py: error:")]
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()
