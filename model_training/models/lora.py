"""LoRA adapters (peft) on a frozen base, and the 4-bit base of QLoRA (bitsandbytes).

`quantize_linear_layers` replaces the base's linear layers by bitsandbytes 4-bit ones itself instead of
passing a `BitsAndBytesConfig` to `from_pretrained`: transformers converts only layers whose type is
exactly `nn.Linear`, so Falcon's `FalconLinear` layers would silently stay in 16 bits. Doing it here also
quantizes a model built from a config (random weights), and the export can redo the same quantization
(`dequantized_weight`) to merge an adapter into exactly the weights it was trained against.

A LoRA model's state dict holds only what is trained (adapters and the rows of added tokens), so DeepSpeed's
checkpoints of it hold nothing else: the frozen base is read again from its source on resume and export.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from model_training.config import ConfigError, PeftConfig, QuantizationConfig
from model_training.models.dtypes import TORCH_DTYPES
from model_training.models.families import FAMILIES

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"

PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {model_type: found.linears for model_type, found in FAMILIES.items()}
"""LoRA targets when `peft.target_modules` is null: every linear layer of each decoder layer's attention and MLP,
by model type (the table of `families.py`)."""


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers a 4-bit base holds in 4 bits: all but the output head (and what is tied to it)."""
    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def quantize_linear_layers(model: nn.Module, qcfg: QuantizationConfig, device: torch.device) -> int:
    """Replace the quantizable linear layers by frozen 4-bit ones on `device`; return how many.

    Each layer is quantized as it moves to `device`, one at a time, so the device never holds the 16-bit
    base whole. bitsandbytes' quantization is deterministic: the same weights give the same 4-bit weights.
    """
    import bitsandbytes as bnb

    layers = quantizable_layers(model)
    for name, linear in layers:
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=TORCH_DTYPES[qcfg.compute_dtype],
            compress_statistics=qcfg.double_quant,
            quant_type=qcfg.quant_type,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=qcfg.double_quant, quant_type=qcfg.quant_type
        )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        # bitsandbytes runs a 4-bit layer in eval mode without grad on an AVX512-BF16 CPU through a
        # fused kernel that computes in bf16 whatever compute_dtype says, and repacks the weights for it in
        # place, so training after an evaluation would go on through that kernel too. Evaluation, training
        # and the export's merge must all compute what training computes: de-quantize, then multiply.
        quantized.support_avx512bf16_for_cpu = False
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quantized.to(device))
    return len(layers)


def dequantized_weight(weight: torch.Tensor, qcfg: QuantizationConfig) -> torch.Tensor:
    """`weight` as the 4-bit base saw it: quantized as in training, then de-quantized to its dtype."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, quant_type=qcfg.quant_type, compress_statistics=qcfg.double_quant)
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def lora_config(model_type: str, pcfg: PeftConfig, new_token_ids: list[int], embedding_name: str) -> Any:
    """peft's LoraConfig for `pcfg`; raises ConfigError when no target modules are known for `model_type`."""
    from peft import LoraConfig

    targets = pcfg.target_modules or PEFT_DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(
            f"no default LoRA target modules for model type '{model_type}'; set peft.target_modules "
            f"(known defaults: {', '.join(PEFT_DEFAULT_TARGETS)})"
        )
    trainable_tokens = {embedding_name: new_token_ids} if pcfg.train_new_tokens and new_token_ids else None
    return LoraConfig(
        r=pcfg.r,
        lora_alpha=pcfg.alpha,
        lora_dropout=pcfg.dropout,
        target_modules=list(targets),
        trainable_token_indices=trainable_tokens,
        bias="none",
        task_type="CAUSAL_LM",
    )


def embedding_module_name(model: nn.Module) -> str:
    """The short name of the input embedding layer (word_embeddings for Falcon, embed_tokens for LLaMA)."""
    embeddings = model.get_input_embeddings()
    return next(name.rpartition(".")[2] for name, m in model.named_modules() if m is embeddings)


def apply_lora(model: nn.Module, pcfg: PeftConfig, new_token_ids: list[int]) -> nn.Module:
    """Freeze `model` and wrap it in a peft model with adapters; its state dict then holds only the trained."""
    from peft import get_peft_model

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = lora_config(model.config.model_type, pcfg, new_token_ids, embedding_module_name(model))
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    peft_model.register_state_dict_post_hook(_keep_trained)
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA: %d of %d parameters trained (%.3f%%)", trained, total, 100 * trained / total)
    return peft_model


def _keep_trained(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Drop every entry but the trained parameters (frozen weights, 4-bit constants, buffers)."""
    trained = {prefix + name for name, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k not in trained]:
        del state_dict[key]


def is_lora_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")
