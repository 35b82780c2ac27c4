"""Training script that test_checkpoint.py runs under the DeepSpeed launcher, on CPU ranks.

``train`` trains a tiny model for ``--steps`` steps and saves after the steps in ``--save-at``; ``resume``
loads the checkpoint ``--resume`` names (default: the latest in ``--out``) into a differently initialised
model and trains on to ``--steps``, saving the same way.
Each rank writes what it observed (losses, learning rates, random draws) to ``<--result>-rank<r>.json``.

Setting CKPT_TEST_FAIL_RANK=r and CKPT_TEST_FAIL_SAVE=n makes rank r's n-th write of its DeepSpeed
optimizer shard fail with "No space left on device".
"""

import argparse
import errno
import json
import os
import random
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model_training.checkpoints.read import resolve_checkpoint
from model_training.cli import exit_process
from model_training.training.checkpoint import load_checkpoint, save_checkpoint


def build_engine(stage: int, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # A warmup, so that a scheduler that was not restored shows in the learning rate and the losses.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10)),
        config=config,
    )
    return engine


def train_step(engine, step: int) -> dict:
    """One optimizer step on a batch that depends only on the step and the rank."""
    generator = torch.Generator().manual_seed(step * 100 + dist.get_rank())
    x = torch.randn(4, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    lr = engine.get_lr()[0]
    loss = nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    return {"step": step, "loss": loss.item(), "lr": lr}


def draw_random() -> list[float]:
    return [random.random(), float(np.random.rand()), *torch.rand(3).tolist()]


def inject_disk_full() -> None:
    if int(os.environ.get("CKPT_TEST_FAIL_RANK", "-1")) != dist.get_rank():
        return
    fail_on = int(os.environ["CKPT_TEST_FAIL_SAVE"])
    real_save = torch.save
    shard_writes = 0

    def save(obj, f, *args, **kwargs):
        nonlocal shard_writes
        if str(f).endswith("optim_states.pt"):
            shard_writes += 1
            if shard_writes == fail_on:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["train", "resume"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int, nargs="*", default=[])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--resume", default="latest")
    args = parser.parse_args()

    deepspeed.init_distributed()
    rank = dist.get_rank()
    report: dict = {"steps": [], "draws": {}}
    engine = build_engine(args.stage, seed=1 if args.action == "train" else 2)
    # Different per rank, so that a rank restoring another rank's RNG file would show, and per action, so
    # that a resume that restored nothing would show.
    offset = 0 if args.action == "train" else 1000
    random.seed(offset + 10 + rank)
    np.random.seed(offset + 20 + rank)
    torch.manual_seed(offset + 30 + rank)

    if args.action == "train":
        inject_disk_full()
        first_step = 1
    else:
        trainer_state = load_checkpoint(engine, resolve_checkpoint(args.resume, args.out))
        report["trainer_state"] = trainer_state
        report["draws"][trainer_state["step"]] = draw_random()
        first_step = trainer_state["step"] + 1

    def write_config(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps({"stage": args.stage}))

    for step in range(first_step, args.steps + 1):
        report["steps"].append(train_step(engine, step))
        if step in args.save_at:
            save_checkpoint(engine, args.out, step, {"step": step}, args.limit, write_extra=write_config)
            report["draws"][step] = draw_random()
    Path(f"{args.result}-rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    exit_process(0)  # see its docstring: native teardown at interpreter exit can abort after ZeRO-3


if __name__ == "__main__":
    main()
