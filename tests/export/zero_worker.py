"""Writes ZeRO checkpoints the trainer does not produce, for test_export.py, under the DeepSpeed launcher.

For each ZeRO stage in ``--stages``: a tiny bf16 Falcon (bf16 training keeps fp32 masters that differ from
the module's bf16 copy) with a frozen parameter (no master) and two persistent buffers (one float, one
integer), one AdamW step, then ``engine.save_checkpoint(--out, tag=f"zero{stage}")``. Run it on a number
of ranks that does not divide the parameter sizes, so that ZeRO-3's padding and ZeRO-1/2's rank boundaries
inside parameters are exercised. ``build_model`` is also what the test compares the untrained values with.
"""

import argparse

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from model_training.cli import exit_process

FROZEN = "transformer.ln_f.weight"


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=500, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.get_parameter(FROZEN).requires_grad_(False)
    model.register_buffer("float_buffer", torch.linspace(-1, 1, 7, dtype=torch.bfloat16))
    model.transformer.register_buffer("int_buffer", torch.arange(5, dtype=torch.int64) * 3)
    return model


def save(stage: int, out: str) -> None:
    model = build_model()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        # PyTorch's AdamW, as the trainer configures it (ds_config.py): no DeepSpeed op to build.
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    input_ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(engine.global_rank))
    loss = engine(input_ids=input_ids, labels=input_ids).loss
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag=f"zero{stage}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    for stage in args.stages:
        save(stage, args.out)
    exit_process(0)  # native teardown at interpreter exit can abort after ZeRO-3 (see its docstring)


if __name__ == "__main__":
    main()
