"""Sections copied from the OpenAssistant trainer train as they are: its published `defaults` section, in a file
of its own under configs/ (every configs/*.yaml contributes sections), with its own configs/zero_config.json."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import REPO, check_ok, read_metrics, run_deepspeed

from model_training.openassistant_keys import NO_EFFECT
from model_training.training.schedule import lr_multiplier

pytestmark = pytest.mark.slow

# The OpenAssistant trainer's 2023 `defaults` section with its published values; only its `datasets` list is
# swapped for the bundled export (its datasets are downloads).
OPENASSISTANT_DEFAULTS = """
openassistant-defaults:
  rng_seed: 0xa1221f97
  learning_rate: 1e-5
  gradient_checkpointing: false
  gradient_accumulation_steps: 32
  per_device_train_batch_size: 2
  per_device_eval_batch_size: 2
  adam_beta1: 0.9
  adam_beta2: 0.95
  adam_epsilon: 1e-12
  weight_decay: 0.00
  warmup_steps: 600
  eval_steps: 200
  save_strategy: steps
  save_steps: 1000
  max_length: 512
  val_max_length:
  num_train_epochs: 3
  logging_steps: 10
  max_grad_norm: 2.0
  save_total_limit: 4
  dtype: bf16
  eval_accumulation_steps:
  freeze_layer:
  datasets:
    - oasst_export:
        input_file_path: oasst_sample.jsonl.gz
        lang: en
        val_split: 0.1
  datasets_extra: []
  cache_dir: .cache
  loss_fn: CrossEntropyLoss
  eval_size:
  log_dir: "base"
  quantization: false
  seq2seqmodel: false
  poly_eps: 1.0
  fuse_gelu: true
  log_wandb: true
  samples_mixing: false
  verbose: false
  output_dir: saved_model
  use_custom_sampler: false
  random_offset_probability: 0.8
  label_masking: true
  residual_dropout: 0.1
  use_flash_attention: false
  sort_by_length: false
  use_system_prefix: false
  system_prefix:
    "You are Joi, a large language model trained by Open-Assistant. Answer as
    concisely as possible.\\nKnowledge cutoff: 2021-09-01\\nCurrent date:
    2023-03-12"
  per_digit_tokens: false
  is_reward_model: false
  deepspeed_config: configs/zero_config.json
"""

# The model this machine can train: the tiny Falcon in fp32 (the CPU ranks have no bf16 matrix units), logs
# in the test's folder, and OpenAssistant's own zero_config.json (WarmupDecayLR, the optimizer offloaded).
TINY_MODEL = """
openassistant-tiny-model:
  model_name: null
  model_config: {{model_type: falcon, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
                 multi_query: true, parallel_attn: true, new_decoder_architecture: false, bias: false, alibi: false}}
  tokenizer_name: data/tokenizer
  dtype: fp32
  log_dir: {log_dir}
  deepspeed_config: tests/fixtures/openassistant/zero_config.json
"""


def test_openassistants_defaults_train_from_a_file_of_their_own(tmp_path: Path) -> None:
    config_file = REPO / "configs" / f"test-openassistant-{os.getpid()}.yaml"
    config_file.write_text(OPENASSISTANT_DEFAULTS + TINY_MODEL.format(log_dir=tmp_path / "logs"))
    try:
        result = check_ok(run_deepspeed(["--configs", "openassistant-defaults", "openassistant-tiny-model",
                                         f"output_dir={tmp_path / 'run'}", "max_steps=3"]))
    finally:
        config_file.unlink()
    # Each of its keys without an effect here is named once (rank 0), with the reason.
    for key in ("use_flash_attention", "per_digit_tokens", "fuse_gelu", "eval_accumulation_steps", "seq2seqmodel",
                "samples_mixing", "verbose", "use_custom_sampler", "poly_eps", "is_reward_model"):
        assert result.stdout.count(f"key '{key}' (in section 'openassistant-defaults'") == 1, key
        assert NO_EFFECT[key] in result.stdout
    # Its schedule (its zero_config.json's WarmupDecayLR with 600 warmup steps) and its batch: 2 ranks x 2 x 32.
    (record,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert record["step"] == 3 and record["lr"] == pytest.approx(1e-5 * lr_multiplier(3, 600, 3, "warmup_decay"))
    assert record["tokens"] > 3 * 128 * 20  # 3 steps of 128 conversations
