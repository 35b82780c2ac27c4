"""The DeepSpeed config: the JSON file's engine settings, with the values the SFT config owns filled in.

The SFT config is the one place for hyperparameters. In the JSON those keys are "auto" (filled here) or
absent (added here); an explicit value that disagrees with the SFT config is an error, not a silent winner.
The learning-rate schedule is ours (model_training/training/schedule.py), so a JSON `scheduler` is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_training.config import ConfigError, TrainConfig, read_deepspeed_json

AUTO = "auto"


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The JSON of `cfg.deepspeed_config` with every SFT-owned value filled and checked against `cfg`."""
    path, ds = read_deepspeed_json(cfg.deepspeed_config)
    if "scheduler" in ds:
        raise ConfigError(
            f"{path} has a 'scheduler' section; the schedule is set by 'lr_scheduler_type' and 'warmup_steps'"
        )
    owned = {
        "bf16.enabled": cfg.dtype == "bf16",
        "fp16.enabled": cfg.dtype == "fp16",
        "optimizer.params.lr": cfg.learning_rate,
        "optimizer.params.betas": [cfg.adam_beta1, cfg.adam_beta2],
        "optimizer.params.eps": cfg.adam_epsilon,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "gradient_clipping": cfg.max_grad_norm,
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
    }
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    for dotted, value in owned.items():
        _fill(ds, dotted, value, path)
    # A non-finite gradient must skip the update rather than corrupt the weights (see the training loop).
    if cfg.dtype == "bf16":
        ds["bf16"].setdefault("check_grad_overflow", True)
    return ds


def _fill(ds: dict[str, Any], dotted: str, value: Any, path: Path) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, AUTO)
    if current == AUTO:
        node[leaf] = value
    elif not _same(current, value):
        raise ConfigError(
            f"{path} sets '{dotted}' to {current!r} but the training config gives {value!r}; "
            "set it to \"auto\" in the JSON (or remove it) and change the training config instead"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
