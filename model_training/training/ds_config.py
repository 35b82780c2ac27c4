"""The DeepSpeed config: the JSON file's engine settings, with the values the SFT config owns filled in.

The SFT config is the one place for hyperparameters. In the JSON those keys are "auto" (filled here) or
absent (added here); an explicit value that disagrees with the SFT config is an error, not a silent winner.
The learning-rate schedule is the trainer's (model_training/training/schedule.py). A JSON `scheduler` is read
only as the OpenAssistant trainer's configs/zero_config.json writes it, WarmupDecayLR, which is our
`warmup_decay` schedule: its values must agree with the config's, and it is then taken out of the JSON.

The optimizer: an Adam(W) that stays on the device is PyTorch's AdamW (`torch_adam`, fused on CUDA), not
DeepSpeed's FusedAdam, whose CUDA op would be JIT-compiled at start (minutes, and it fails on some clusters'
TORCH_CUDA_ARCH_LIST). Only an offloaded optimizer is DeepSpeed's: its CPU Adam, the one op still built, with
the arch list cleaned first (`clean_cuda_arch_list`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from model_training.config import (
    ConfigError,
    TrainConfig,
    closest_name,
    first_line,
    optimizer_offloaded,
    read_deepspeed_json,
)

AUTO = "auto"
logger = logging.getLogger(__name__)


def build_deepspeed_config(
    cfg: TrainConfig, world_size: int, cuda: bool = False, total_steps: int | None = None
) -> dict[str, Any]:
    """The JSON of `cfg.deepspeed_config` with every SFT-owned value filled and checked against `cfg`.

    `cuda`: the ranks train on GPUs, where PyTorch's AdamW runs fused. `total_steps`: the run's optimizer
    steps, which an explicit `total_num_steps` of the JSON's scheduler must equal.
    """
    path, ds = read_deepspeed_json(cfg.deepspeed_config)
    if "scheduler" in ds:
        _check_scheduler(ds.pop("scheduler"), cfg, total_steps, path)
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
    _choose_adam(ds, cuda)
    # A non-finite gradient must skip the update rather than corrupt the weights (see the training loop).
    if cfg.dtype == "bf16":
        ds["bf16"].setdefault("check_grad_overflow", True)
    return ds


def check_deepspeed_json(cfg: TrainConfig) -> None:
    """ConfigError, before any rank starts, when the JSON of `cfg.deepspeed_config` has a top-level key DeepSpeed does
    not read (it ignores those silently: a misspelled section would train without it) or a section that DeepSpeed's
    own checks (its pydantic models and readers) refuse, with the config's values filled in."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    path, raw = read_deepspeed_json(cfg.deepspeed_config)
    known = sorted(deepspeed_keys())
    for key in raw:
        if key not in known:
            raise ConfigError(f"key 'deepspeed_config': {path} has the key '{key}', which DeepSpeed does not read (it "
                              f"would be ignored){closest_name(key, known)}")
    ds = build_deepspeed_config(cfg, world_size=1)
    # Section by section, so that a refusal names its section; then all together, for the checks across sections.
    for section in [*({key: value} for key, value in ds.items()), ds]:
        try:
            DeepSpeedConfig._initialize_params(_Settings(), dict(section))
        except pydantic.ValidationError as err:
            error = err.errors(include_url=False)[0]
            dotted = ".".join([*(section if len(section) == 1 else ()), *map(str, error["loc"])])
            raise ConfigError(f"key 'deepspeed_config': {path} sets '{dotted}' to {error['input']!r}; expected: "
                              f"{error['msg']}") from None
        except (TypeError, ValueError, AttributeError, AssertionError, KeyError) as err:
            where = f"section '{next(iter(section))}'" if len(section) == 1 else "settings"
            raise ConfigError(f"key 'deepspeed_config': DeepSpeed refuses the {where} of {path}: "
                              f"{first_line(err)}") from None


class _Settings:
    """What DeepSpeed's config reader stores the values it reads into (checked here, then dropped)."""


@functools.cache
def deepspeed_keys() -> frozenset[str]:
    """The top-level keys DeepSpeed reads: recorded while its own config reader runs over an empty config, so that
    the list follows the installed release."""
    from deepspeed.runtime.config import DeepSpeedConfig

    class Recorder(dict):
        read: set[str] = set()

        def get(self, key: Any, default: Any = None) -> Any:
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key: Any) -> Any:
            self.read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key: object) -> bool:
            self.read.add(key)  # type: ignore[arg-type]
            return super().__contains__(key)

        def keys(self) -> Any:  # `key in param_dict.keys()`, as some readers ask
            return self

    # One key that is not DeepSpeed's: a reader that skips an empty config still asks for its own.
    DeepSpeedConfig._initialize_params(_Settings(), Recorder({"": None}))
    # Read by DeepSpeedConfig.__init__ and deepspeed.initialize, outside the reader, to size the parallel groups.
    return frozenset(Recorder.read - {""} | {"sequence_parallel_size", "data_parallel_size"})


def _check_scheduler(scheduler: Any, cfg: TrainConfig, total_steps: int | None, path: Path) -> None:
    """A JSON scheduler must be the one `lr_scheduler_type=warmup_decay` runs, with the config's values."""
    kind = scheduler.get("type") if isinstance(scheduler, dict) else None
    if kind != "WarmupDecayLR":
        raise ConfigError(
            f"{path} has a scheduler of type {kind!r}; the schedule is set by 'lr_scheduler_type' and "
            "'warmup_steps' (a JSON scheduler is read only as WarmupDecayLR, the OpenAssistant trainer's)"
        )
    if cfg.lr_scheduler_type != "warmup_decay":
        raise ConfigError(
            f"{path} schedules WarmupDecayLR but 'lr_scheduler_type' is '{cfg.lr_scheduler_type}'; set "
            "lr_scheduler_type=warmup_decay, or remove the JSON's scheduler section"
        )
    expected = {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.learning_rate, "warmup_num_steps": cfg.warmup_steps,
                "total_num_steps": total_steps, "warmup_type": "log"}
    for key, value in (scheduler.get("params") or {}).items():
        if key not in expected:
            raise ConfigError(f"{path}: scheduler parameter '{key}' is not one of WarmupDecayLR's")
        if value != AUTO and expected[key] is not None and not _same(value, expected[key]):
            raise ConfigError(
                f"{path} sets 'scheduler.params.{key}' to {value!r} but the training config gives "
                f"{expected[key]!r}; set it to \"auto\" in the JSON and change the training config instead"
            )


def _choose_adam(ds: dict[str, Any], cuda: bool) -> None:
    """PyTorch's AdamW for an Adam(W) on the device (fused on CUDA); DeepSpeed's CPU Adam when offloaded.

    A JSON that says `torch_adam: false` keeps DeepSpeed's FusedAdam, as asked.
    """
    optimizer = ds["optimizer"]
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw") or optimizer_offloaded(ds):
        return
    params = optimizer.setdefault("params", {})
    if params.setdefault("torch_adam", True):
        params.setdefault("fused", cuda)


def clean_cuda_arch_list(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Drop variant suffixes from TORCH_CUDA_ARCH_LIST ("9.0a" -> "9.0") for DeepSpeed's op builds; log it.

    PyTorch accepts the arch-specific variants that NVIDIA images and many clusters set; DeepSpeed's op builder parses
    each entry as int.int and its JIT build fails with "invalid literal for int()". The plain architecture
    builds code that runs on the same GPUs. Returns the cleaned value when it changed anything.
    """
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    entries = [entry for entry in re.split(r"[;\s]+", value.strip()) if entry]
    plain = [re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", entry) for entry in entries]
    if plain == entries:
        return None
    cleaned = ";".join(plain)
    environ["TORCH_CUDA_ARCH_LIST"] = cleaned
    logger.info("TORCH_CUDA_ARCH_LIST %r -> %r for DeepSpeed's op builds (it cannot parse variant suffixes)",
                value, cleaned)
    return cleaned


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
