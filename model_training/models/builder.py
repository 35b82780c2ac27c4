"""Tokenizer and model construction: pretrained weights or a config with random weights, ZeRO-3 aware."""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.integrations import HfDeepSpeedConfig

from model_training.config import TrainConfig, resolve_input_path
from model_training.data.formatting import prepare_tokenizer
from model_training.models.residual_dropout import apply_residual_dropout
from model_training.training.ds_config import zero_stage

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EMBEDDING_MULTIPLE = 16
"""Embedding rows are padded to a multiple of this: tensor cores and sharding like round sizes."""

# transformers follows ZeRO-3 (zero.Init on load, gathered resize) only while an HfDeepSpeedConfig object is
# alive; it keeps a weak reference, so this module keeps the strong one for the life of the process.
_hf_deepspeed_config: HfDeepSpeedConfig | None = None


def _hub_or_local(name: str) -> str:
    """A name that exists as a folder under the project root is local; anything else is a hub id."""
    local = resolve_input_path(name)
    return str(local) if local.is_dir() else name


def load_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer with the chat tokens added in their fixed order and pad/eos set for the model family."""
    name = cfg.tokenizer_name or cfg.model_name  # validate() guarantees one of them
    tokenizer = AutoTokenizer.from_pretrained(
        _hub_or_local(name), cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
    )
    return prepare_tokenizer(tokenizer)


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The causal LM, its embeddings resized for the added tokens, residual dropout and checkpointing applied.

    Must run after torch.distributed is initialized and before `deepspeed.initialize`: under ZeRO-3 the
    weights are partitioned as they are created, so a 40B model never exists whole on one rank.
    """
    global _hf_deepspeed_config
    if zero_stage(ds_config) == 3:
        _hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    dtype = TORCH_DTYPES[cfg.dtype]
    # The same seed on every rank: random weights must be identical across data-parallel replicas.
    transformers.set_seed(cfg.rng_seed)
    if cfg.model_config is not None:
        options = dict(cfg.model_config)
        config = AutoConfig.for_model(options.pop("model_type"), **options)
        config.vocab_size = _padded(len(tokenizer))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            _hub_or_local(cfg.model_name),
            dtype=dtype,
            cache_dir=cfg.cache_dir,
            trust_remote_code=cfg.trust_remote_code,
        )
    # Gathered under ZeRO-3 by transformers itself; new rows start at the mean of the old ones.
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    if cfg.residual_dropout > 0:
        probabilities = apply_residual_dropout(model, cfg.residual_dropout, cfg.residual_dropout_lima)
        logger.info("residual dropout per layer: %s", [round(p, 4) for p in probabilities])
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _padded(n: int) -> int:
    return -(-n // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
