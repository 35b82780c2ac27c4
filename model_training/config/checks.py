"""The checks the types cannot express: choices, ranges, the model source, the DeepSpeed JSON, each stage's limits.

`validate` runs them all on a merged `TrainConfig` (loading.py calls it last, before anything is loaded); the
ranges are one table, `_RANGES`. A stage's own limits (`check_reward_model`, `check_dpo`, `check_rl`) run where its
row in model_training/stages.py names them. The DeepSpeed JSON's reader and its two questions (`zero_stage`,
`optimizer_offloaded`) live here because a check reads them first; the trainers ask them again. Imports schema.py
only, never loading.py.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from model_training.config.schema import PROJECT_ROOT, TrainConfig, resolve_input_path
from model_training.data.chat_formats import CHAT_FORMATS
from model_training.errors import ConfigError, closest_name, first_line
from model_training.hub import is_hub_id
from model_training.layout import is_training_run
from model_training.stages import STAGES

_CHOICES = {
    "dpo.loss_type": ("sigmoid", "ipo"),
    "dtype": ("bf16", "fp16", "fp32"),
    "chat_format": tuple(CHAT_FORMATS),
    "peft.type": (None, "lora"),
    "quantization.quant_type": ("nf4", "fp4"),
    "quantization.compute_dtype": ("bf16", "fp16", "fp32"),
    "lr_scheduler_type": ("warmup_decay", "cosine", "linear", "constant"),
    "save_strategy": ("steps", "epoch", "no"),
    "rl_algorithm": ("ppo", "grpo"),
    "grpo.loss_normalization": ("sequence", "token", "constant"),
}
_POSITIVE = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "save_steps",
    "logging_steps",
    "max_nonfinite_steps",
    "generate_max_new_tokens",
    "peft.r",
    "ppo.max_prompt_length",
    "ppo.num_rollouts",
    "ppo.rollout_batch_size",
    "ppo.policy_epochs",
    "ppo.ppo_steps_per_epoch",
    "ppo.value_epochs",
    "ppo.value_steps_per_epoch",
    "ppo.max_new_tokens",
)


class _Range(NamedTuple):
    """The finite numbers a key takes; an open end excludes its bound."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return "positive" if self.low_open and self.low == 0 else f"at least {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


_POSITIVE_REAL = _Range(0, low_open=True)
_NON_NEGATIVE = _Range(0)
_FRACTION = _Range(0, 1, high_open=True)
_RANGES = {
    # What torch's AdamW and the schedule accept; a NaN or an infinity is refused too (torch takes some of them).
    "learning_rate": _NON_NEGATIVE,  # 0 is AdamW's too: a step that computes the gradient and moves nothing
    "weight_decay": _NON_NEGATIVE,
    "adam_beta1": _FRACTION,
    "adam_beta2": _FRACTION,
    "adam_epsilon": _POSITIVE_REAL,
    "max_grad_norm": _NON_NEGATIVE,
    "warmup_steps": _NON_NEGATIVE,
    # A sample's first token is the target of none: one token alone trains nothing, and evaluates to 0 / 0.
    "max_length": _Range(2),
    "val_max_length": _Range(2),
    "num_train_epochs": _POSITIVE_REAL,
    "random_offset_probability": _Range(0, 1),
    "residual_dropout": _FRACTION,
    "wandb_init_timeout": _POSITIVE_REAL,
    "data_wait_timeout": _POSITIVE_REAL,
    "stop_grace_period": _POSITIVE_REAL,
    "peft.alpha": _POSITIVE_REAL,
    "peft.dropout": _FRACTION,
    "dpo.beta": _POSITIVE_REAL,
    "dpo.label_smoothing": _Range(0, 0.5, high_open=True),
    "ppo.value_learning_rate": _POSITIVE_REAL,
    "ppo.kl_coef": _NON_NEGATIVE,
    "ppo.gamma": _Range(0, 1),
    "ppo.lam": _Range(0, 1),
    "ppo.clip_policy": _POSITIVE_REAL,
    "ppo.clip_value": _POSITIVE_REAL,
    "ppo.top_p": _Range(0, 1, low_open=True),
    "ppo.temperature": _POSITIVE_REAL,
    "ppo.samples_to_log": _NON_NEGATIVE,
    "grpo.group_size": _Range(2),  # a group of one has nothing to be compared with
    "grpo.clip_low": _FRACTION,
    "grpo.clip_high": _NON_NEGATIVE,
    "grpo.kl_coef": _NON_NEGATIVE,
}
"""The valid numbers of each numeric key that has a natural range (null, where a key allows it, is not checked)."""


def validate(cfg: TrainConfig) -> None:
    """Checks the types cannot express: choices, ranges, the model source (each dataset's options are checked
    where they are typed, `TrainConfig.dataset_specs`)."""
    if cfg.stage not in STAGES:  # read at each call: a stage may be added to the table after this module is imported
        raise ConfigError(f"key 'stage' is '{cfg.stage}'; expected one of null, {', '.join(STAGES)}")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            shown = ", ".join("null" if c is None else c for c in choices)
            raise ConfigError(f"key '{key}' is '{_get(cfg, key)}'; expected one of {shown}")
    for key in _POSITIVE:
        if _get(cfg, key) < 1:
            raise ConfigError(f"key '{key}' must be at least 1, got {_get(cfg, key)}")
    for key, valid in _RANGES.items():
        value = _get(cfg, key)
        if value is not None and not valid.holds(value):
            nullable = " or null" if _get(_DEFAULTS, key) is None else ""
            raise ConfigError(f"key '{key}' must be {valid}{nullable}, got {value}")
    if cfg.gradient_checkpointing_layers is not None and cfg.gradient_checkpointing_layers < 0:
        raise ConfigError(f"key 'gradient_checkpointing_layers' must be at least 0 or null, got "
                          f"{cfg.gradient_checkpointing_layers}")
    _validate_openassistant_options(cfg)
    if cfg.generate_val_samples < 0:
        raise ConfigError(f"key 'generate_val_samples' must be at least 0, got {cfg.generate_val_samples}")
    _validate_peft(cfg)
    _validate_objectives(cfg)
    stage = STAGES[cfg.stage]
    if stage.check is not None:
        stage.call("check", cfg, stage.command)
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ConfigError(f"key 'save_total_limit' must be at least 1 or null, got {cfg.save_total_limit}")
    if cfg.lr_decay_steps is not None and (cfg.lr_decay_steps < 1 or cfg.lr_scheduler_type == "warmup_decay"):
        raise ConfigError(f"key 'lr_decay_steps' is {cfg.lr_decay_steps}; expected at least 1, with "
                          f"lr_scheduler_type cosine or linear (it is {cfg.lr_scheduler_type})")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"key 'min_lr_ratio' is {cfg.min_lr_ratio}; expected a fraction of the peak from 0 to 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"key 'max_steps' must be at least 1 or null, got {cfg.max_steps}")
    if cfg.data_workers is not None and cfg.data_workers < 1:
        raise ConfigError(f"key 'data_workers' must be at least 1 or null, got {cfg.data_workers}")
    if (cfg.model_name is None) == (cfg.model_config is None):
        raise ConfigError(
            "set exactly one of 'model_name' (a pretrained model) and 'model_config' (random weights); "
            f"got model_name={cfg.model_name!r}, model_config={'set' if cfg.model_config else None}"
        )
    if cfg.model_config is not None and "model_type" not in cfg.model_config:
        raise ConfigError("key 'model_config' needs a 'model_type' (e.g. falcon)")
    if cfg.model_config is not None and cfg.tokenizer_name is None:
        raise ConfigError("a model built from 'model_config' needs 'tokenizer_name' (a folder or hub id)")
    if cfg.model_config is not None:
        _check_model_type(cfg.model_config["model_type"])
    _check_local_folders(cfg)
    _, ds = read_deepspeed_json(cfg.deepspeed_config)
    if not cfg.deepspeed:
        _validate_without_deepspeed(cfg, ds)


_DEFAULTS = TrainConfig()


def _get(cfg: TrainConfig, dotted_key: str) -> Any:
    value: Any = cfg
    for part in dotted_key.split("."):
        value = getattr(value, part)
    return value


def _check_model_type(model_type: Any) -> None:
    name = str(model_type)
    if name in _generated_model_types():
        return
    # Slow (it imports torch), so only for a name the generated list lacks: the library adds a few by hand.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if name not in CONFIG_MAPPING_NAMES:
        raise ConfigError(
            f"key 'model_config.model_type' is {model_type!r}, which transformers does not know (expected a model "
            f"type such as falcon, llama or gpt_neox){closest_name(name, list(CONFIG_MAPPING_NAMES), 3)}"
        )


@functools.cache
def _generated_model_types() -> tuple[str, ...]:
    """transformers' model types, read from its generated mapping without importing the library (that takes
    seconds, which `--show_config` must not); empty where a release has no such file or another layout."""
    spec = importlib.util.find_spec("transformers")
    path = Path(spec.origin).parent / "models" / "auto" / "auto_mappings.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        return ()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if "CONFIG_MAPPING_NAMES" in targets and isinstance(node.value, ast.Call) and node.value.args:
            return tuple(name for name, _ in ast.literal_eval(node.value.args[0]))
    return ()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Files of a saved tokenizer: a folder with none of them holds no tokenizer."""


def _check_local_folders(cfg: TrainConfig) -> None:
    """A local model or tokenizer folder must exist and hold what transformers loads from it; a model may also be
    a training checkpoint or run folder."""
    model = _local_folder(cfg, "model_name")
    # A training checkpoint is exported when the run starts (training/start.py), with its tokenizer.
    checkpoint = model is not None and is_training_run(model)
    if checkpoint and cfg.peft.type is not None:
        raise ConfigError(f"key 'model_name' is the training checkpoint {model}, which LoRA cannot take as its "
                          "base; export it first (python export_model.py CHECKPOINT --output_folder DIR) and set "
                          "model_name=DIR")
    if model is not None and not checkpoint and not (model / "config.json").is_file():
        raise ConfigError(f"key 'model_name': the folder {model} has no config.json; expected a model folder "
                          "saved by save_pretrained, or a training checkpoint or run folder")
    tokenizer_key = "tokenizer_name" if cfg.tokenizer_name is not None else "model_name"
    if checkpoint and tokenizer_key == "model_name":
        return
    tokenizer = _local_folder(cfg, tokenizer_key)
    if tokenizer is not None and not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"key '{tokenizer_key}': the folder {tokenizer} holds no tokenizer; expected one of "
                          f"{', '.join(TOKENIZER_FILES)}, as save_pretrained writes them")


def _local_folder(cfg: TrainConfig, key: str) -> Path | None:
    """The existing folder that `key` (dotted for a nested key) names; None for null or a hub id."""
    name = _get(cfg, key)
    if name is None or is_hub_id(name, PROJECT_ROOT):
        return None
    folder = resolve_input_path(name)
    if not folder.is_dir():
        raise ConfigError(f"key '{key}' is the local path {name!r}, but the folder {folder} does not exist; "
                          "expected a folder saved by save_pretrained, or a hub id such as tiiuae/falcon-7b")
    return folder


_DEEPSPEED_SECTIONS_READ = ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16")
"""The sections of the DeepSpeed JSON this trainer reads or fills in (training/ds_config.py)."""


def read_deepspeed_json(path: str) -> tuple[Path, dict[str, Any]]:
    """The DeepSpeed config file named by `deepspeed_config`, parsed; ConfigError when it is missing or is not a
    JSON object."""
    resolved = resolve_input_path(path)
    try:
        ds = json.loads(resolved.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"key 'deepspeed_config': the DeepSpeed config {resolved} does not exist; expected a JSON "
                          "file such as configs/zero_config.json") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"key 'deepspeed_config': cannot read {resolved}: {first_line(err)}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"key 'deepspeed_config': {resolved} is not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"key 'deepspeed_config': {resolved} holds a JSON {type(ds).__name__}; expected an object "
                          "of DeepSpeed settings")
    for section in _DEEPSPEED_SECTIONS_READ:
        if not isinstance(ds.get(section, {}), dict):
            raise ConfigError(f"key 'deepspeed_config': {resolved} sets '{section}' to {ds[section]!r}; expected an "
                              "object of its settings")
    return resolved, ds


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it says nothing)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def optimizer_offloaded(ds: dict[str, Any]) -> bool:
    """Whether the optimizer state lives in host memory (ZeRO-Offload), where DeepSpeed's CPU Adam steps it."""
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return str(device).lower() not in ("none", "")


def _validate_without_deepspeed(cfg: TrainConfig, ds: dict[str, Any]) -> None:
    """deepspeed=false: what only DeepSpeed does is refused, rather than trained some other way."""
    if cfg.dtype == "fp16":
        raise ConfigError("key 'dtype' is fp16, which needs DeepSpeed's loss scaling; with deepspeed=false train in "
                          "bf16 (autocast over fp32 weights) or fp32")
    if zero_stage(ds) == 3:
        wanted = "ZeRO-3, which partitions the model over the ranks"
    elif optimizer_offloaded(ds):
        wanted = "an offloaded optimizer (offload_optimizer)"
    else:
        return
    raise ConfigError(
        f"deepspeed=false keeps the whole model and optimizer on every rank, but 'deepspeed_config' "
        f"({cfg.deepspeed_config}) asks for {wanted}; drop deepspeed=false (--no-deepspeed), or name a ZeRO-0/1/2 "
        "JSON such as configs/zero_config.json, which plain PyTorch does not read further"
    )


def _validate_openassistant_options(cfg: TrainConfig) -> None:
    for key in ("eval_size", "freeze_layer"):
        value = getattr(cfg, key)
        if value is not None and value < (0 if key == "freeze_layer" else 1):
            raise ConfigError(f"key '{key}' must be {'at least 0' if key == 'freeze_layer' else 'positive'} or "
                              f"null, got {value}")
    if cfg.freeze_layer is not None and cfg.peft.type is not None:
        raise ConfigError("key 'freeze_layer' freezes layers of a full fine-tuning; with peft.type=lora the whole "
                          "base is frozen already: set freeze_layer=null")
    if cfg.use_system_prefix and not cfg.system_prefix:
        raise ConfigError("key 'use_system_prefix' is true but 'system_prefix' is empty; give the system text")


def _validate_objectives(cfg: TrainConfig) -> None:
    """The options of DPO, PPO and GRPO that are wrong whichever stage reads them."""
    if cfg.dpo.loss_type == "ipo" and cfg.dpo.label_smoothing:
        raise ConfigError("key 'dpo.label_smoothing' applies to loss_type sigmoid; IPO has none, set it to 0")
    ppo = cfg.ppo
    if not 0 <= ppo.min_new_tokens <= ppo.max_new_tokens:
        raise ConfigError(f"key 'ppo.min_new_tokens' must be in [0, {ppo.max_new_tokens}], got {ppo.min_new_tokens}; "
                          "it cannot exceed ppo.max_new_tokens")
    if not math.isfinite(cfg.grpo.reward_model_weight):
        raise ConfigError(f"key 'grpo.reward_model_weight' must be a finite number, got {cfg.grpo.reward_model_weight}")


def check_reward_model(cfg: TrainConfig, command: str) -> None:
    """trainer_rm.py's limits (stages.py names this check)."""
    _check_preference_stage(cfg, command)
    if cfg.generate_samples:
        raise ConfigError("key 'generate_samples' is set, but a reward model does not generate; set it to []")
    _check_preference_data(cfg, command)


def check_dpo(cfg: TrainConfig, command: str) -> None:
    """trainer_dpo.py's limits (stages.py names this check)."""
    _check_preference_stage(cfg, command)
    _check_preference_data(cfg, command)
    if cfg.residual_dropout:
        raise ConfigError(f"key 'residual_dropout' is {cfg.residual_dropout}, but DPO's reference log-probabilities "
                          "are the starting policy's without dropout, so the margins would not start at 0; set "
                          "residual_dropout=0")


def _check_preference_stage(cfg: TrainConfig, command: str) -> None:
    if cfg.peft.type is not None or cfg.quantization.load_in_4bit:
        raise ConfigError(f"{command} trains every weight; set peft.type=null and quantization.load_in_4bit=false")


def _check_preference_data(cfg: TrainConfig, command: str) -> None:
    if cfg.generate_val_samples:
        raise ConfigError(f"key 'generate_val_samples' is set, but {command} has no validation conversations to "
                          "answer, only ranked replies; set it to 0")
    if cfg.use_system_prefix:
        raise ConfigError(f"key 'use_system_prefix' is true, but {command} reads each comparison's own system "
                          "message (preference_jsonl's messages); set it to false")


def check_rl(cfg: TrainConfig, command: str) -> None:
    """trainer_rl.py's limits, PPO's and GRPO's (stages.py names this check)."""
    if cfg.rl_algorithm == "grpo" and not cfg.grpo.reward_functions and not cfg.ppo.reward_model:
        raise ConfigError("GRPO needs rewards: set 'grpo.reward_functions' (e.g. [{function: "
                          "'model_training.training.rewards:exact_answer'}]) or 'ppo.reward_model'")
    if not cfg.deepspeed:
        raise ConfigError(f"{command} trains the policy and the value model on DeepSpeed; drop deepspeed=false")
    if cfg.peft.type is not None or cfg.quantization.load_in_4bit:
        raise ConfigError(f"{command} trains every weight; set peft.type=null and quantization.load_in_4bit=false")
    if cfg.residual_dropout:
        raise ConfigError(f"key 'residual_dropout' is {cfg.residual_dropout}, but PPO's ratio to the rollout policy "
                          "and the KL to the reference are taken without dropout; set residual_dropout=0")
    if cfg.generate_samples or cfg.generate_val_samples:
        raise ConfigError(f"keys 'generate_samples' and 'generate_val_samples' are set, but {command} logs its own "
                          "samples of each logged step (ppo.samples_to_log); set them to [] and 0")
    if cfg.model_config is not None:
        raise ConfigError("key 'model_config' is set, but PPO starts from a trained policy, which is also its frozen "
                          "reference; set model_name to an SFT export, checkpoint or run folder")
    for key in ("ppo.reward_model", "ppo.value_model"):
        folder = _local_folder(cfg, key)
        if folder is not None and not is_training_run(folder) and not (folder / "config.json").is_file():
            raise ConfigError(f"key '{key}': the folder {folder} has no config.json; expected a reward model saved by "
                              "export_model.py, or a trainer_rm.py checkpoint or run folder")
    if cfg.ppo.prompt_file is None and not cfg.dataset_specs:
        raise ConfigError(f"{command} needs prompts: set 'ppo.prompt_file' or 'datasets'")


def _validate_peft(cfg: TrainConfig) -> None:
    if cfg.peft.target_modules is not None and not cfg.peft.target_modules:
        raise ConfigError("key 'peft.target_modules' is an empty list; name the layers or use null for the defaults")
    if cfg.quantization.load_in_4bit and cfg.peft.type is None:
        raise ConfigError(
            "key 'quantization.load_in_4bit' is true but 'peft.type' is null: 4-bit weights cannot be trained "
            "directly; set peft.type=lora (QLoRA)"
        )


