"""The DeepSpeed JSON: SFT-owned values filled from the training config, contradictions refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_training.config import ConfigError, load_config, parse_override, zero_stage
from model_training.training.ds_config import (
    build_deepspeed_config,
    check_deepspeed_json,
    clean_cuda_arch_list,
    deepspeed_keys,
)

TINY = ["defaults", "tiny-falcon", "oasst-sample"]


def config(*overrides: str):
    return load_config(TINY, [parse_override(o) for o in overrides])


@pytest.mark.parametrize(
    ("path", "stage"),
    [("configs/zero_config.json", 2), ("configs/zero3_config.json", 3), ("configs/zero3_offload_config.json", 3)],
)
def test_shipped_configs_fill_every_auto(path: str, stage: int) -> None:
    cfg = config(f"deepspeed_config={path}", "dtype=bf16", "per_device_train_batch_size=4",
                 "gradient_accumulation_steps=3", "learning_rate=2e-5", "weight_decay=0.1", "max_grad_norm=0.5")
    ds = build_deepspeed_config(cfg, world_size=2)
    assert "auto" not in json.dumps(ds)
    assert zero_stage(ds) == stage
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert ds["fp16"]["enabled"] is False
    hyperparameters = {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-12, "weight_decay": 0.1}
    # PyTorch's AdamW on the device; DeepSpeed's CPU Adam (no torch_adam) where the optimizer is offloaded.
    pytorch_adam = {"torch_adam": True, "fused": False} if "offload" not in path else {}
    assert ds["optimizer"]["params"] == {**hyperparameters, **pytorch_adam}
    assert ds["gradient_clipping"] == 0.5
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4, 3, 24)


def test_agreeing_explicit_values_are_fine_and_contradictions_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1,
                                "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}}))
    ds = build_deepspeed_config(config(f"deepspeed_config={path}"), world_size=1)
    assert ds["optimizer"]["params"]["lr"] == 3e-3 and ds["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match=r"sets 'optimizer.params.lr' to 0.003 but the training config gives 0.001"):
        build_deepspeed_config(config(f"deepspeed_config={path}", "learning_rate=1e-3"), world_size=1)
    with pytest.raises(ConfigError, match=r"sets 'gradient_accumulation_steps' to 1 but the training config gives 2"):
        build_deepspeed_config(config(f"deepspeed_config={path}", "gradient_accumulation_steps=2"), world_size=1)


OPENASSISTANT_ZERO = Path(__file__).resolve().parents[1] / "fixtures" / "openassistant" / "zero_config.json"
"""The OpenAssistant trainer's configs/zero_config.json, as it publishes it (WarmupDecayLR, optimizer offload)."""


def test_openassistants_zero_config_loads_as_it_is() -> None:
    # tiny-falcon sets its own schedule; the one OpenAssistant's JSON names is the schema's default.
    cfg = config(f"deepspeed_config={OPENASSISTANT_ZERO}", "lr_scheduler_type=warmup_decay", "warmup_steps=20")
    ds = build_deepspeed_config(cfg, world_size=2, total_steps=100)
    # Its WarmupDecayLR is our warmup_decay schedule: taken out of what DeepSpeed is given.
    assert "scheduler" not in ds
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]  # offloaded: DeepSpeed's CPU Adam


@pytest.mark.parametrize(
    ("scheduler", "overrides", "message"),
    [
        ({"type": "WarmupLR"}, [], r"has a scheduler of type 'WarmupLR'; the schedule is set by 'lr_scheduler_type'"),
        ({"type": "WarmupDecayLR"}, ["lr_scheduler_type=cosine"],
         r"schedules WarmupDecayLR but 'lr_scheduler_type' is 'cosine'"),
        ({"type": "WarmupDecayLR", "params": {"warmup_num_steps": 50}}, ["warmup_steps=20"],
         r"sets 'scheduler.params.warmup_num_steps' to 50 but the training config gives 20"),
        ({"type": "WarmupDecayLR", "params": {"total_num_steps": 99}}, [],
         r"sets 'scheduler.params.total_num_steps' to 99 but the training config gives 100"),
        ({"type": "WarmupDecayLR", "params": {"warmup_type": "linear"}}, [],
         r"sets 'scheduler.params.warmup_type' to 'linear' but the training config gives 'log'"),
        ({"type": "WarmupDecayLR", "params": {"warmup_min": 0}}, [], r"'warmup_min' is not one of WarmupDecayLR's"),
    ],
)
def test_a_json_scheduler_other_than_the_config_says_is_refused(
    tmp_path: Path, scheduler: dict, overrides: list[str], message: str
) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"scheduler": scheduler}))
    cfg = config(f"deepspeed_config={path}", "lr_scheduler_type=warmup_decay", *overrides)
    with pytest.raises(ConfigError, match=message):
        build_deepspeed_config(cfg, world_size=1, total_steps=100)


def test_missing_and_broken_json_are_refused_with_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'deepspeed_config': the DeepSpeed config .*nope.json does not exist"):
        config(f"deepspeed_config={tmp_path / 'nope.json'}")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"key 'deepspeed_config': .*bad.json is not valid JSON"):
        config(f"deepspeed_config={tmp_path / 'bad.json'}")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"list.json holds a JSON list; expected an object of DeepSpeed settings"):
        config(f"deepspeed_config={tmp_path / 'list.json'}")


def test_the_optimizer_needs_no_cuda_op_build_unless_it_is_offloaded(tmp_path: Path) -> None:
    """PyTorch's AdamW, fused on GPUs: nothing for DeepSpeed to JIT-compile at start. A JSON that asks for
    DeepSpeed's FusedAdam keeps it; an offloaded optimizer is DeepSpeed's CPU Adam."""
    on_gpus = build_deepspeed_config(config(), world_size=8, cuda=True)
    assert on_gpus["optimizer"]["params"]["torch_adam"] is True and on_gpus["optimizer"]["params"]["fused"] is True
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}))
    fused_adam = build_deepspeed_config(config(f"deepspeed_config={path}"), 1, cuda=True)
    assert "fused" not in fused_adam["optimizer"]["params"]
    offloaded = build_deepspeed_config(config("deepspeed_config=configs/zero3_offload_config.json"), 8, cuda=True)
    assert "torch_adam" not in offloaded["optimizer"]["params"]


@pytest.mark.parametrize(
    ("given", "cleaned"),
    [("9.0a", "9.0"), ("8.0;9.0a;10.0a+PTX", "8.0;9.0;10.0+PTX"), ("8.6 10.0f 12.0a", "8.6;10.0;12.0"),
     ("7.5 8.6 9.0", None), ("8.9;Hopper", None), ("", None)],
)
def test_cuda_arch_variants_are_removed_for_deepspeed_op_builds(given: str, cleaned: str | None) -> None:
    environ = {"TORCH_CUDA_ARCH_LIST": given}
    assert clean_cuda_arch_list(environ) == cleaned
    assert environ["TORCH_CUDA_ARCH_LIST"] == (cleaned or given)


@pytest.mark.parametrize("path", ["configs/zero_config.json", "configs/zero3_config.json",
                                  "configs/zero3_offload_config.json", str(OPENASSISTANT_ZERO)])
def test_deepspeed_accepts_every_shipped_json(path: str) -> None:
    check_deepspeed_json(config(f"deepspeed_config={path}", "lr_scheduler_type=warmup_decay"))


def test_the_known_keys_are_the_ones_deepspeed_reads() -> None:
    keys = deepspeed_keys()
    assert {"zero_optimization", "bf16", "optimizer", "gradient_clipping", "train_batch_size", "autotuning"} <= keys
    assert not keys & {"zero_optimisation", "", "stage", "params"}


@pytest.mark.parametrize(
    ("json_text", "message"),
    [
        ('{"zero_optimization": {"stage": 2}, "wall_clock_breakdwn": true}',
         r"has the key 'wall_clock_breakdwn', which DeepSpeed does not read .*did you mean 'wall_clock_breakdown'\?"),
        ('{"zero_optimization": {"stage": 2, "overlap_com": true}}',
         r"sets 'zero_optimization\.overlap_com' to True; expected: Extra inputs are not permitted"),
        ('{"fp16": {"enabled": "auto", "loss_scale": -1}}',
         r"sets 'fp16\.loss_scale' to -1; expected: .*loss_scale must be >= 0"),
        ('{"zero_optimization": {"stage": 2}, "optimizer": [1]}',
         r"sets 'optimizer' to \[1\]; expected an object of its settings"),
    ],
)
def test_a_json_deepspeed_would_refuse_or_ignore_is_one_line(tmp_path: Path, json_text: str, message: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json_text)
    with pytest.raises(ConfigError, match=message):
        check_deepspeed_json(config(f"deepspeed_config={path}"))
