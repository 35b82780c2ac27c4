"""Exports of a LoRA checkpoint: the adapter alone (a peft folder), or the base with the adapter merged in.

A LoRA checkpoint holds only the trained tensors (adapters, rows of added tokens) and, in ``adapter/``, the
peft config that names the base. The adapter export needs no base weights: peft's own module tree is built
on the meta device to name the tensors as ``PeftModel.from_pretrained`` expects them. The merge loads the
base in the training dtype, gives it the embedding rows training had, and, for a 4-bit (QLoRA) run, replaces
each quantized layer's weights by their 4-bit round trip, which is what the adapter was trained against;
then peft merges W + (alpha / r) * B @ A into each layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from model_training.config import TrainConfig, first_line
from model_training.layout import ADAPTER_DIR
from model_training.models.dtypes import TORCH_DTYPES
from model_training.models.lora import dequantized_weight, quantizable_layers

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterExportError(ValueError):
    """The adapter cannot be exported or merged as asked; the message says why."""


def is_adapter_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / ADAPTER_DIR / "adapter_config.json").is_file()


def read_lora_config(checkpoint: Path):  # noqa: ANN201 - peft's LoraConfig, imported lazily
    from peft import LoraConfig

    return LoraConfig.from_pretrained(str(checkpoint / ADAPTER_DIR))


def write_adapter(
    folder: Path,
    checkpoint: Path,
    config: PretrainedConfig,
    trained: dict[str, torch.Tensor],
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> int:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``; return the tensor count.

    The folder loads with ``PeftModel.from_pretrained(base, folder)`` once the base has the embedding rows
    training had (``base.resize_token_embeddings(config.vocab_size)``): the adapter carries the rows the
    resize added (the chat format's tokens and the padding to a multiple of 16).
    """
    from peft import get_peft_model, get_peft_model_state_dict

    lora = read_lora_config(checkpoint)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model = get_peft_model(base, lora)
    _load_trained(model, trained, assign=True)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    save_file({name: t.to(dtype).contiguous() for name, t in state.items()}, folder / ADAPTER_WEIGHTS_NAME,
              metadata={"format": "pt"})
    lora.inference_mode = True
    lora.save_pretrained(str(folder))
    return len(state)


def merged_model(
    checkpoint: Path,
    run_config: TrainConfig,
    config: PretrainedConfig,
    trained: dict[str, torch.Tensor],
    base_model: str | None,
    trust_remote_code: bool,
    cache_dir: Path | None,
) -> nn.Module:
    """The base with the adapter merged in, in the training dtype; ``base_model`` overrides the base the
    checkpoint names (a moved folder, a local copy of a hub model)."""
    from peft import get_peft_model

    lora = read_lora_config(checkpoint)
    source = base_model or lora.base_model_name_or_path
    if not source:
        raise AdapterExportError(f"checkpoint {checkpoint} names no base model; pass --base_model")
    try:
        base = AutoModelForCausalLM.from_pretrained(
            source, dtype=TORCH_DTYPES[run_config.dtype], trust_remote_code=trust_remote_code, cache_dir=cache_dir
        )
    except (OSError, ValueError) as exc:
        raise AdapterExportError(
            f"cannot load the base model {source!r} to merge into: {first_line(exc)} (pass --base_model)"
        ) from exc
    if base.get_input_embeddings().weight.shape[0] != config.vocab_size:
        base.resize_token_embeddings(config.vocab_size)
    if run_config.quantization.load_in_4bit:
        # On a GPU when there is one: training quantized there, and the CPU kernels may round differently.
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        with torch.no_grad():
            for _, linear in quantizable_layers(base):
                linear.weight.copy_(dequantized_weight(linear.weight.to(device), run_config.quantization))
        logger.info("merging into the 4-bit round trip of the base: what the adapter was trained against")
    model = get_peft_model(base, lora)
    _load_trained(model, trained, assign=False)
    return model.merge_and_unload()


def _load_trained(model: nn.Module, trained: dict[str, torch.Tensor], assign: bool) -> None:
    """Load the checkpoint's tensors into the peft model; they must be exactly its trainable parameters."""
    wanted = {name for name, p in model.named_parameters() if p.requires_grad}
    # Tied aliases (lm_head's view of the embedding adapter) come along; the model ties them itself.
    missing = sorted(wanted - trained.keys())
    unexpected = sorted(trained.keys() - set(model.state_dict()))
    if missing or unexpected:
        raise AdapterExportError(
            f"the checkpoint's tensors do not fit its adapter config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.load_state_dict({k: v for k, v in trained.items() if k in wanted}, strict=False, assign=assign)
