"""LoRA adapters and the 4-bit base (bitsandbytes NF4 runs on the CPU), on a tiny Falcon; default targets per family."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from helpers import MODELS, tiny_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model_training.config import ConfigError, PeftConfig, QuantizationConfig, load_config, parse_override
from model_training.data.formatting import SPECIAL_TOKENS, prepare_tokenizer
from model_training.models.builder import build_model
from model_training.models.families import FAMILIES
from model_training.models.lora import (
    apply_lora,
    dequantized_weight,
    lora_config,
    quantizable_layers,
    quantize_linear_layers,
)

DATA = Path(__file__).resolve().parents[2] / "data"
TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def tiny_falcon(seed: int = 0) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, bias=False, alibi=False, vocab_size=2032,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def test_lora_trains_only_adapters_and_new_token_rows() -> None:
    model = apply_lora(tiny_falcon(), PeftConfig(type="lora", r=4, alpha=8.0, dropout=0.0), [2023, 2024, 2025])
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    lora_layers = {name.split(".lora_")[0] for name in trained if ".lora_" in name}
    assert len(lora_layers) == 2 * len(TARGETS)  # every attention and MLP projection of both layers
    assert {layer.rsplit(".", 1)[1] for layer in lora_layers} == set(TARGETS)
    assert [name for name in trained if ".lora_" not in name] == [
        "base_model.model.transformer.word_embeddings.token_adapter.trainable_tokens_delta.default"
    ]
    # What a checkpoint holds: exactly the trained tensors.
    assert set(model.state_dict()) == trained


def test_new_tokens_are_not_trained_when_switched_off() -> None:
    pcfg = PeftConfig(type="lora", r=4, train_new_tokens=False)
    model = apply_lora(tiny_falcon(), pcfg, [2023, 2024, 2025])
    assert all(".lora_" in name for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", MODELS)
def test_every_family_gets_adapters_on_all_its_attention_and_mlp_linear_layers(name: str) -> None:
    """The default targets come from the family table: every linear layer of every decoder layer, no other."""
    model = apply_lora(tiny_model(name), PeftConfig(type="lora", r=4), [])
    wrapped = [path for path, m in model.named_modules() if isinstance(m, LoraLayer)]
    family = FAMILIES[model.config.model_type]
    # Each linear layer of both decoder layers once (test_families.py: the table names all of them), no head.
    assert sorted(path.rpartition(".")[2] for path in wrapped) == sorted(2 * family.linears)
    assert all(f".{family.layers}." in path for path in wrapped)


def test_unknown_model_type_needs_target_modules() -> None:
    with pytest.raises(ConfigError, match="no default LoRA target modules for model type 'mpt'; set peft.target_mod"):
        lora_config("mpt", PeftConfig(type="lora"), [], "wte")
    assert lora_config("mpt", PeftConfig(type="lora", target_modules=["Wqkv"]), [], "wte").target_modules == {"Wqkv"}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_base_computes_with_the_dequantized_weights(quant_type: str) -> None:
    qcfg = QuantizationConfig(load_in_4bit=True, quant_type=quant_type, compute_dtype="fp32")
    reference = tiny_falcon()
    expected_names = [name for name, _ in quantizable_layers(reference)]
    with torch.no_grad():
        for _, linear in quantizable_layers(reference):
            linear.weight.copy_(dequantized_weight(linear.weight, qcfg))
    quantized = tiny_falcon()
    assert quantize_linear_layers(quantized, qcfg, torch.device("cpu")) == len(expected_names) == 8
    layers = dict(quantized.named_modules())
    assert all(isinstance(layers[name], bnb.nn.Linear4bit) for name in expected_names)
    assert not isinstance(quantized.lm_head, bnb.nn.Linear4bit)
    ids = torch.randint(0, 2032, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, full = quantized(ids).logits, reference(ids).logits, tiny_falcon()(ids).logits
    # The export merges into these de-quantized weights: they must be what the 4-bit layers compute with.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - full).abs().max() > 1e-3  # and 4 bits do change the model


def test_4bit_layers_compute_in_eval_as_in_training() -> None:
    """bitsandbytes would run eval-mode 4-bit layers on an AVX512-BF16 CPU through a bf16 kernel (about 3e-3
    off in fp32 compute) and keep their weights repacked for it afterwards; ours always de-quantize."""
    model = tiny_falcon()
    quantize_linear_layers(model, QuantizationConfig(load_in_4bit=True, compute_dtype="fp32"), torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 8 and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.randint(0, 2032, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = model.train()(ids).logits
        evaluated = model.eval()(ids).logits
        after = model.train()(ids).logits
    assert torch.equal(evaluated, trained) and torch.equal(after, trained)


def test_qlora_checkpoint_state_has_no_4bit_constants() -> None:
    model = tiny_falcon()
    quantize_linear_layers(model, QuantizationConfig(load_in_4bit=True, compute_dtype="fp32"), torch.device("cpu"))
    model = apply_lora(model, PeftConfig(type="lora", r=4), [])
    assert model.state_dict() and all(".lora_" in key for key in model.state_dict())
    ids = torch.randint(0, 2032, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["peft.type=lora"], "LoRA runs on ZeRO-2, not ZeRO-3"),
        (["peft.type=lora", "quantization.load_in_4bit=true"], "a 4-bit base .* cannot be partitioned by ZeRO-3"),
    ],
)
def test_lora_and_4bit_are_refused_under_zero3(overrides: list[str], message: str) -> None:
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override(o) for o in overrides])
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(DATA / "tokenizer"))
    with pytest.raises(ConfigError, match=message):
        build_model(cfg, tokenizer, {"zero_optimization": {"stage": 3}})


def test_build_model_wires_quantization_and_lora() -> None:
    overrides = ["peft.type=lora", "peft.r=4", "quantization.load_in_4bit=true", "quantization.compute_dtype=fp32"]
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [parse_override(o) for o in overrides])
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(DATA / "tokenizer"))
    model = build_model(cfg, tokenizer, {"zero_optimization": {"stage": 2}})
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 8
    delta = model.base_model.model.transformer.word_embeddings.token_adapter.trainable_tokens_delta["default"]
    assert delta.shape == (len(SPECIAL_TOKENS), 64)  # the chat tokens' rows are trained


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_step_in_bf16_on_cuda() -> None:
    """A QLoRA training step as on the GPU: the base in NF4 on CUDA, bf16 compute, bf16 adapters."""
    device = torch.device("cuda")
    model = tiny_falcon().to(torch.bfloat16)
    qcfg = QuantizationConfig(load_in_4bit=True, compute_dtype="bf16")
    quantize_linear_layers(model, qcfg, device)
    model = apply_lora(model.to(device), PeftConfig(type="lora", r=8), []).to(device)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 8 and all(m.weight.device.type == "cuda" and m.weight.dtype == torch.uint8 for m in layers)
    ids = torch.randint(0, 2032, (2, 64), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
