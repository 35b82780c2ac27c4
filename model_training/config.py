"""The training configuration: a typed schema, named sections merged in order, command-line overrides.

`TrainConfig` below is the user's manual: every key, its type, its default and one line on what it does.
`configs/config.yaml` holds named sections; `--configs defaults falcon-7b oasst-top1` starts from the
schema's defaults and merges each section in order (later wins; nested mappings merge, lists replace), then
the command line's `key=value` overrides. Every user mistake becomes a `ConfigError` whose message names the
key, where it came from and the closest valid name; the CLI turns it into exit status 2, never a traceback.

Paths: inputs (the DeepSpeed config, `data_dir`, a local tokenizer or model folder) given relative resolve
against the project root, so a run does not depend on the working directory; a relative dataset file is looked
up in `cache_dir` (when set, as the OpenAssistant trainer reads its datasets there), then in `data_dir`. Outputs
(`output_dir`, `log_dir`) and `cache_dir` are relative to the working directory, as users expect.

`model_name` and `tokenizer_name` are hub ids when they have a hub id's form, `name` or `owner/name`, and
are local folders otherwise: anything that starts with `/`, `.` or `~`, ends with `/` or has a second `/`,
and any name whose first part is a file or folder under the project root (`data/tokenizr` is the folder
`data/` and a typo, never a hub id). A local folder must exist when the config is validated.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import json
import logging
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from model_training import openassistant_keys
from model_training.data.chat_formats import CHAT_FORMATS
from model_training.data.sources import SOURCES
from model_training.data.sources.common import DatasetConfig
from model_training.hub import is_hub_id
from model_training.layout import is_training_run

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
"""Every `*.yaml` file here contributes config sections."""
DEFAULT_CONFIG_FILE = CONFIG_DIR / "config.yaml"


class ConfigError(ValueError):
    """A mistake in a config file or on the command line; the message says what and where."""


# ---------------------------------------------------------------------------------------------------------------
# Datasets. Each entry of `datasets:` is `{name: {options}}` (or a bare name when every option has a default); the
# name picks a source of model_training/data/sources/ (`SOURCES`), whose options dataclass is that entry's schema.


class DatasetSpec(NamedTuple):
    """One entry of `datasets` (or `datasets_extra`), typed: its source's name and its options (the source's
    schema, model_training/data/sources/)."""

    name: str
    options: DatasetConfig


# ---------------------------------------------------------------------------------------------------------------
# Parameter-efficient fine-tuning and the quantized base it can train on.


@dataclass
class PeftConfig:
    """LoRA adapters (peft) on a frozen base model; `type: null` trains every weight."""

    type: str | None = None
    """null (full fine-tuning) or lora."""
    r: int = 64
    """Rank of each adapter's update B @ A."""
    alpha: float = 16.0
    """Scale of the update: W + (alpha / r) * B @ A."""
    dropout: float = 0.1
    """Dropout on each adapter's input."""
    target_modules: list[str] | None = None
    """Names of the linear layers that get adapters; null: the model type's attention and MLP projections."""
    train_new_tokens: bool = True
    """Train the embedding rows of the tokens the chat format added (their new rows start untrained)."""


@dataclass
class QuantizationConfig:
    """The frozen base held in 4 bits (bitsandbytes), as QLoRA does; needs `peft.type: lora`."""

    load_in_4bit: bool = False
    """Quantize every linear layer of the base (not the output head) to 4 bits."""
    quant_type: str = "nf4"
    """4-bit data type: nf4 (normal float, QLoRA's) or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (about 0.4 bits per weight saved)."""
    compute_dtype: str = "bf16"
    """Dtype the 4-bit weights are de-quantized to for each matrix product: bf16, fp16 or fp32."""


# ---------------------------------------------------------------------------------------------------------------
# The preference stages: the reward model (trainer_rm.py) reads no options of its own beyond the shared ones; DPO:


@dataclass
class DpoConfig:
    """Direct preference optimization (trainer_dpo.py): the policy trained against a frozen reference, the same
    starting weights."""

    beta: float = 0.1
    """Strength of the tie to the reference: the implicit reward of a reply is beta * (log pi - log pi_ref)."""
    loss_type: str = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta * margin) over summed log-probabilities; ipo: IPO's (margin - 1 / (2 beta))^2
    over per-token mean log-probabilities."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is wrong (conservative DPO, sigmoid only): the loss mixes in the flipped pair."""


@dataclass
class PpoConfig:
    """PPO (trainer_rl.py): the policy (`model_name`) and a value model trained on rollouts scored by a frozen reward
    model, with a KL penalty against the frozen starting policy. A step is one round: rollouts, then the policy's
    and the value model's optimizer steps on them."""

    reward_model: str | None = None
    """The frozen reward model: a trainer_rm.py export, checkpoint or run folder (a hub id works too)."""
    value_model: str | None = None
    """Where the value model starts (a reward model: its score head becomes the per-token value); null: reward_model."""
    frozen_zero3: bool = False
    """Partition the frozen reference and reward model over the ranks (ZeRO-3 inference) instead of holding each whole
    on every rank in the run's dtype: for models that do not fit."""
    prompt_file: str | None = None
    """A JSON-lines file of prompts, {"prompt": text} or {"messages": [...ending on a user turn]} per line (`datasets`
    are then not read); null: the conversations of `datasets`, each up to its last assistant turn."""
    max_prompt_length: int = 1024
    """Longest prompt in tokens (chat format included); a longer one is an error that names it."""
    drop_long_prompts: bool = False
    """Leave out the prompts longer than max_prompt_length (how many is logged) instead of stopping at the first."""
    num_rollouts: int = 1024
    """Continuations generated per step, over all ranks."""
    rollout_batch_size: int = 16
    """Prompts each rank generates from (and scores) at once."""
    policy_epochs: int = 1
    """Passes of the policy over each step's rollouts."""
    ppo_steps_per_epoch: int = 1
    """Policy optimizer steps per pass: each takes an equal share of the rollouts."""
    value_epochs: int = 1
    """Passes of the value model over each step's rollouts."""
    value_steps_per_epoch: int = 8
    """Value optimizer steps per pass."""
    value_learning_rate: float | None = None
    """Peak learning rate of the value model; null: `learning_rate`."""
    kl_coef: float = 0.01
    """Weight of the per-token KL penalty, -kl_coef * (log pi - log pi_ref), in each token's reward."""
    gamma: float = 1.0
    """Discount of future rewards."""
    lam: float = 0.95
    """GAE's lambda: 1 is the Monte Carlo return, 0 the one-step estimate."""
    clip_policy: float = 0.2
    """Clip range of the policy's probability ratio."""
    clip_value: float = 0.2
    """Clip range of the value's change from its rollout-time estimate."""
    whiten_advantages: bool = True
    """Normalize the advantages of each step to zero mean and unit variance, over all ranks."""
    whiten_rewards: bool = False
    """Scale the per-token rewards of each step to unit variance, over all ranks, before GAE."""
    score_on_eod: bool = True
    """The reward model's score is the reward of the continuation's last token, its end of document (EOD); false: it
    is spread evenly over the continuation's tokens."""
    max_new_tokens: int = 1024
    """Longest continuation in tokens."""
    min_new_tokens: int = 0
    """Shortest continuation: the end token is not sampled before this many tokens."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p; 1: all tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    samples_to_log: int = 4
    """Continuations of each logged step shown in the samples table (wandb, samples.jsonl)."""


@dataclass
class GrpoConfig:
    """GRPO (trainer_rl.py with `rl_algorithm: grpo`): `group_size` continuations of each prompt, rewarded by Python
    functions and/or the reward model, each one's advantage relative to its group; no value model. Rollouts, prompts
    and the policy's optimizer steps follow the `ppo` keys that are not about the value model or GAE."""

    group_size: int = 8
    """Continuations sampled per prompt; `ppo.num_rollouts` must be a multiple of group_size x ranks."""
    reward_functions: list[Any] = field(default_factory=list)
    """[{function: 'module:function', weight: 1.0, options: {...}}]: each continuation's reward is the weighted sum
    (training/rewards.py; a weight of 0 only logs the function)."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score (`ppo.reward_model`) in the reward, when one is set."""
    scale_rewards: bool = True
    """Divide the advantages by their group's standard deviation (GRPO); false: only center them (Dr. GRPO, which
    finds the division favours groups that are almost all right or all wrong)."""
    loss_normalization: str = "token"
    """How token losses are averaged: sequence (each continuation's mean, then their mean: GRPO; short answers weigh
    more), token (over all tokens: DAPO) or constant (sum / (continuations x max_new_tokens): Dr. GRPO, unbiased)."""
    clip_low: float = 0.2
    """The ratio's lower clip, 1 - clip_low: how far one update may lower a token's probability."""
    clip_high: float = 0.2
    """The ratio's upper clip, 1 + clip_high; DAPO raises it (0.28) so rare tokens can grow and entropy holds."""
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the reference in the loss (GRPO paper 0.04); 0: none, and no reference held."""


STAGES = ("sft", "rm", "dpo", "rl")
"""The training stages, each with its command: trainer_sft.py, trainer_rm.py, trainer_dpo.py, trainer_rl.py."""
STAGE_COMMANDS = {"sft": "trainer_sft.py", "rm": "trainer_rm.py", "dpo": "trainer_dpo.py", "rl": "trainer_rl.py"}


# ---------------------------------------------------------------------------------------------------------------
# The schema. Field docstrings are the documentation; `--show_config` prints the merged values.


@dataclass
class TrainConfig:
    # --- model ---
    model_name: str | None = None
    """Hub id or local folder of a pretrained model (e.g. tiiuae/falcon-7b); null when `model_config` is set."""
    model_config: dict[str, Any] | None = None
    """Build the model from this transformers config (needs `model_type`) with random weights instead."""
    tokenizer_name: str | None = None
    """Hub id or local folder of the tokenizer; null: the one of `model_name`."""
    dtype: str = "bf16"
    """Training precision: bf16, fp16 or fp32 (also the dtype the weights are loaded in)."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off, because Falcon, LLaMA and GPT-NeoX are in transformers."""
    cache_dir: str | None = None
    """Hugging Face cache folder for downloaded models; null: the library's default. Also the first folder relative
    dataset paths are looked up in, as in the OpenAssistant trainer."""
    residual_dropout: float = 0.0
    """Dropout on the output of each attention and MLP sublayer before the residual add."""
    residual_dropout_lima: bool = False
    """LIMA schedule: layer i of L drops with residual_dropout * i / (L - 1) instead of a flat rate."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    freeze_layer: int | None = None
    """Freeze the input embeddings (and an output head tied to them) and the first this many decoder layers
    (OpenAssistant's); null: train every layer."""
    gradient_checkpointing_layers: int | None = None
    """Selective checkpointing: recompute only the first this many decoder layers (faster, more memory); null: all."""
    torch_compile: bool = False
    """Compile each decoder layer with torch.compile (fuses the work around the matrix products; ZeRO-0/1/2);
    the first steps pay the compilation."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """LoRA instead of full fine-tuning (`peft.type=lora` on the command line turns it on)."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """A 4-bit base for QLoRA."""

    # --- data ---
    datasets: list[Any] = field(default_factory=list)
    """Training datasets: a list of `{name: {options}}` (or bare names); each name and its options are a source of
    model_training/data/sources/ (`SOURCES`)."""
    datasets_extra: list[Any] = field(default_factory=list)
    """Appended to `datasets`, so the command line can add a source without repeating a section's list."""
    data_dir: str = "data"
    """Folder relative dataset paths are looked up in (after `cache_dir`); itself relative to the project root."""
    max_length: int = 2048
    """Longest training sample in tokens; a longer conversation is cut to this (random_offset_probability)."""
    val_max_length: int | None = None
    """Longest validation sample in tokens; null: max_length."""
    random_offset_probability: float = 0.8
    """A conversation longer than the limit trains on a window at a random offset with this probability (drawn
    anew each epoch, seeded), else on its first tokens; validation windows stay the same (OpenAssistant's 0.8)."""
    label_masking: bool = True
    """Loss on the assistant's replies only; false: on every token of the conversation."""
    use_system_prefix: bool = False
    """Put `system_prefix` before every sample as the chat format's system turn, without loss, outside the cut."""
    system_prefix: str | None = None
    """The system text `use_system_prefix` puts before every sample."""
    sort_by_length: bool = False
    """Order each epoch's draw by sample length (ties at random), shuffled within runs of 200 samples, as
    OpenAssistant's sampler does: micro-batches of like lengths pad less when packing=false."""
    chat_format: str = "openassistant"
    """How conversations are written: openassistant (<|prompter|> tokens), human_bot (<human>: / <bot>:),
    falcon_instruct (User: / Assistant:) or falcon_chat (User: / Falcon:); see data/chat_formats.py."""
    dedupe: bool = True
    """Drop conversations that repeat an earlier one exactly (same system, roles and texts), across sources."""
    data_cache_dir: str | None = "~/.cache/model_training/tokenized"
    """Token stores of the prepared datasets, reused while their inputs stay the same, shared by every process that
    sees the folder (data/cache.py); null: each process prepares its own and keeps nothing."""
    data_workers: int | None = None
    """Processes a rank forks to tokenize a dataset it must prepare; null: its cores, shared with its node's ranks."""
    data_wait_timeout: float = 1800.0
    """Seconds a process waits on another's share of a data preparation without any chunk finishing, then stops."""
    packing: bool = True
    """Lay each micro-batch's samples end to end in one row, no padding; each sample attends only to itself (every
    family of models/families.py: Falcon, Llama, Mistral, Qwen2, GPT-NeoX)."""
    chunked_loss: bool = True
    """Cross-entropy from the last hidden states chunk by chunk, without full fp32 logits (ZeRO-0/1/2, not LoRA)."""
    show_dataset_stats: bool = False
    """Print per-dataset statistics (threads, tokens, truncation) and exit."""
    prepare_only: bool = False
    """Prepare the datasets' token stores in `data_cache_dir` (all cores, no GPU, no launcher needed), say what was
    stored, and exit: run ahead of a job, whose ranks then start with a cache hit."""

    # --- optimization ---
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW, reached after the warmup."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_epsilon: float = 1e-12
    """AdamW epsilon (OpenAssistant's)."""
    max_grad_norm: float = 2.0
    """Clip the global gradient norm to this value (OpenAssistant's 2.0); 0 disables clipping."""
    lr_scheduler_type: str = "warmup_decay"
    """warmup_decay: DeepSpeed's WarmupDecayLR as OpenAssistant ran it (log warmup, linear decay to 0); or a
    linear warmup, then cosine or linear (to `min_lr_ratio` of the peak) or constant (training/schedule.py)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `learning_rate`."""
    lr_decay_steps: int | None = None
    """Optimizer steps of the cosine or linear decay after the warmup, then held at its end; null: to the end."""
    min_lr_ratio: float = 0.0
    """Where the cosine or linear decay ends, as a fraction of `learning_rate` (0: transformers' and OpenAssistant's
    end; warmup_decay and constant ignore it)."""
    num_train_epochs: float = 1
    """Passes over the training data; a fraction trains that share of the first epoch's steps (ignored when
    `max_steps` is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps instead of `num_train_epochs`."""
    per_device_train_batch_size: int = 1
    """Samples per micro-batch on each rank."""
    per_device_eval_batch_size: int = 1
    """Samples per evaluation batch on each rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank."""

    # --- evaluation, checkpoints, logging ---
    eval_steps: int | None = None
    """Evaluate every this many optimizer steps (and always at the end); null: only at the end."""
    eval_size: int | None = None
    """Evaluate on the first this many samples of each validation set (OpenAssistant's); null: all of them."""
    save_strategy: str = "steps"
    """When to save checkpoints: steps (every `save_steps`), epoch, or no."""
    save_steps: int = 500
    """Optimizer steps between checkpoints when `save_strategy` is steps."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed after a new one is complete); null: keep all."""
    output_dir: str = "output"
    """Run folder: checkpoints, metrics.jsonl, the merged config."""
    overwrite_output_dir: bool = False
    """Start a new run in an output_dir that holds an earlier one, deleting its checkpoints and metrics; without
    it, such a run is refused (resume the earlier one with resume_from_checkpoint, or choose another folder)."""
    log_dir: str = "logs"
    """Folder for wandb's local files."""
    logging_steps: int = 10
    """Write a metrics line every this many optimizer steps."""
    log_wandb: bool = False
    """Log metrics and the config to Weights & Biases (offline mode works without network)."""
    wandb_entity: str | None = None
    """Weights & Biases entity (user or team); null: wandb's default."""
    wandb_project: str = "model_training"
    """Weights & Biases project."""
    wandb_init_timeout: float = 30.0
    """Seconds to wait for the wandb service at start; then metrics go to an offline wandb run instead."""
    generate_samples: list[str] = field(default_factory=list)
    """After training, answer these prompts and write samples.jsonl / samples.md (and a wandb table)."""
    generate_val_samples: int = 0
    """After training, also answer the first prompts of this many validation conversations."""
    generate_max_new_tokens: int = 128
    """Longest answer of the sample generation, in tokens (greedy decoding)."""

    # --- run ---
    deepspeed_config: str = "configs/zero_config.json"
    """DeepSpeed JSON; keys set to "auto" are filled from this config, and contradictions are errors. With
    deepspeed=false only its ZeRO stage and offloading are read, to refuse what plain PyTorch cannot do."""
    deepspeed: bool = True
    """Train on DeepSpeed; false (`--no-deepspeed`, as in the OpenAssistant trainer): plain PyTorch on the same
    loop, one process or DistributedDataParallel under torchrun, in fp32 or bf16 (training/torch_engine.py)."""
    local_rank: int = -1
    """Set by launchers that pass --local_rank; the LOCAL_RANK environment variable wins when present."""
    resume_from_checkpoint: str | None = None
    """"latest" (the newest complete checkpoint in output_dir), "auto" (latest when output_dir holds one, else a new
    run: a requeued job's command) or a checkpoint folder to continue from."""
    verify_checkpoint_hashes: bool = True
    """Before resuming, check every file of the checkpoint against the hash its manifest recorded (the ranks
    share the reading); false skips it, and a corrupted file would then be trained on."""
    stop_grace_period: float = 240.0
    """Seconds from a stop signal (SIGTERM, SIGUSR1, SIGINT) to the committed checkpoint; past them the ranks exit
    without it (status 124), before the scheduler's kill. Keep it under the lead of SLURM's --signal."""
    rng_seed: int = 0xA1221F97
    """Seed of weight initialization, dropout and data order (OpenAssistant's default, 0xa1221f97)."""
    max_nonfinite_steps: int = 3
    """Stop with an error after this many optimizer steps in a row with a non-finite loss (each is skipped)."""

    # --- stage ---
    stage: str | None = None
    """What is trained: sft (a chat model), rm (a reward model: a scalar head on the model, ranking loss), dpo (a chat
    model from preference pairs) or rl (PPO against a reward model); null: the command's (trainer_sft.py,
    trainer_rm.py, trainer_dpo.py, trainer_rl.py). A section that sets it runs with its own command only."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """DPO's options (stage dpo)."""
    ppo: PpoConfig = field(default_factory=PpoConfig)
    """PPO's options (stage rl); GRPO reads its rollout and prompt keys too."""
    rl_algorithm: str = "ppo"
    """The rl stage's algorithm: ppo (a reward model and a value model) or grpo (group-relative, no value model)."""
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    """GRPO's options (rl_algorithm grpo)."""

    @functools.cached_property
    def dataset_specs(self) -> list[DatasetSpec]:
        """`datasets` + `datasets_extra`, typed and checked against their sources' options, parsed once: by
        `load_config`, which knows the section each list came from for its messages, else on first use."""
        return parse_dataset_specs(self, {})


_CHOICES = {
    "stage": (None, *STAGES),
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


def closest_name(name: str, candidates: list[str], n: int = 1) -> str:
    """'; did you mean 'x'?' for the candidate closest to a mistyped name ("'x', 'y' or 'z'" for up to `n` of
    them), or '' when none is close."""
    matches = [f"'{match}'" for match in difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)]
    if not matches:
        return ""
    listed = matches[0] if len(matches) == 1 else f"{', '.join(matches[:-1])} or {matches[-1]}"
    return f"; did you mean {listed}?"


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def _describe_omegaconf_error(err: OmegaConfBaseException, schema: type, where: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        *parents, leaf = str(key).split(".")
        for parent in parents:  # a nested section (peft.r): suggest among that section's keys
            nested = next((f.default_factory for f in fields(schema) if f.name == parent), None)
            schema = nested if is_dataclass(nested) else schema
        valid = [f.name for f in fields(schema)]
        # A dataset's options or a nested section have few keys: all of them fit on the line, and a user who guessed
        # a name ('path') sees the real one. The top level's hundred keys would not; config.py lists them.
        suggestion = closest_name(leaf, valid)
        listed = "" if schema is TrainConfig else f"{' V' if suggestion else '; v'}alid keys: {', '.join(valid)}"
        return f"unknown key '{key}' {where}{suggestion}{listed}"
    # OmegaConf's message is several lines with internals; its first line says what was wrong with the value.
    reason = str(getattr(err, "msg", err)).splitlines()[0]
    return f"bad value for key '{key}' {where}: {reason}"


def _merge(base: Any, update: Any, schema: type, where: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err, schema, where)) from None


class _YamlLoader(yaml.SafeLoader):
    """YAML as users mean it (YAML 1.2's scalars): `1e-5` is a float, and only true/false are booleans, so
    `save_strategy: no` stays the string "no" (YAML 1.1 reads yes/no/on/off as booleans)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_sections(config_file: Path) -> dict[str, Any]:
    """The named sections of a config file, as plain mappings."""
    try:
        with open(config_file, encoding="utf-8") as f:
            sections = yaml.load(f, Loader=_YamlLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_file}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_file} is not valid YAML: {err}") from None
    if sections is None:
        return {}
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ConfigError(f"{config_file} must be a mapping of section names to mappings of keys")
    return sections


def read_config_folder(folder: Path = CONFIG_DIR) -> dict[str, tuple[dict[str, Any], Path]]:
    """Every section of every `*.yaml` in `folder` (as the OpenAssistant trainer reads its configs/), with the
    file it came from; a section defined in two files is an error that names both."""
    found: dict[str, tuple[dict[str, Any], Path]] = {}
    for config_file in sorted(folder.glob("*.yaml")):
        for name, section in read_sections(config_file).items():
            if name in found:
                raise ConfigError(f"config section '{name}' is defined twice: in {_display_path(found[name][1])} "
                                  f"and in {_display_path(config_file)}; rename one of them")
            found[name] = (section, config_file)
    return found


def _display_path(path: Path) -> str:
    """Paths in messages as the user would type them: relative to the project root when inside it."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` (dotted keys reach nested values) -> (key, value parsed as YAML, so `1e-5` is a float).

    A value that YAML cannot parse is taken as a plain string (a prompt such as `What is: this?`), unless it
    opens with YAML syntax (`[`, `{` or a quote): then the user meant YAML, and the error says where it broke."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command-line override '{item}' must look like key=value")
    try:
        value = yaml.load(raw, Loader=_YamlLoader) if raw else ""
    except yaml.YAMLError as err:
        if not raw.lstrip().startswith(("[", "{", '"', "'")):
            return key.strip(), raw
        mark = getattr(err, "problem_mark", None)
        where = f" at column {len(key) + 2 + mark.column} of the override" if mark else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise ConfigError(f"command-line override '{item}' is not valid YAML: {problem}{where}") from None
    return key.strip(), value


def _nest(dotted_key: str, value: Any) -> dict[str, Any]:
    node: Any = value
    for part in reversed(dotted_key.split(".")):
        node = {part: node}
    return node


def load_config(
    section_names: list[str],
    overrides: list[tuple[str, Any]] | None = None,
    config_file: Path | None = None,
    stage: str = "sft",
) -> TrainConfig:
    """Merge the schema's defaults, the named sections in order, then the overrides, and validate, for the command
    of `stage`: a config whose `stage` names another is refused, one without takes `stage`.

    The sections come from every `configs/*.yaml`, or from `config_file` alone. OpenAssistant trainer keys the
    schema lacks are read or dropped with one warning each (model_training/openassistant_keys.py).
    """
    if config_file is None:
        sections = read_config_folder()
    else:
        sections = {name: (section, config_file) for name, section in read_sections(config_file).items()}
    shown = _display_path(config_file) if config_file else f"{_display_path(CONFIG_DIR)}/*.yaml"
    if not section_names:
        raise ConfigError(f"no config section given; --configs takes section names first (then key=value "
                          f"overrides), from those in {shown}: {', '.join(sections)}")
    merged = OmegaConf.structured(TrainConfig)
    warnings: dict[str, str] = {}
    origins: dict[str, str] = {}  # dataset list key -> where it was set, for `parse_dataset_specs`'s messages
    for name in section_names:
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}' in {shown}{closest_name(name, list(sections))}")
        section, origin = sections[name]
        where = f"in section '{name}' of {_display_path(origin)}"
        section = openassistant_keys.translate(section, where, warnings)
        merged = _merge(merged, section, TrainConfig, where)
        # Lists replace: the last section that sets a dataset list is where its mistakes are.
        origins.update({key: f" {where}" for key in _DATASET_KEYS if key in section})
    for key, value in overrides or []:
        override = openassistant_keys.translate(_nest(key, value), "on the command line", warnings)
        merged = _merge(merged, override, TrainConfig, "on the command line")
        origins.update({name: "" for name in _DATASET_KEYS if name in override})
    for message in warnings.values():
        logger.warning("%s", message)
    cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.stage not in (None, stage) and cfg.stage in STAGE_COMMANDS:
        raise ConfigError(f"key 'stage' is {cfg.stage!r}: this config trains with {STAGE_COMMANDS[cfg.stage]}, not "
                          f"{STAGE_COMMANDS[stage]}")
    cfg.stage = cfg.stage or stage
    cfg.dataset_specs = parse_dataset_specs(cfg, origins)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks the types cannot express: choices, ranges, the model source (each dataset's options are checked
    where they are typed, `TrainConfig.dataset_specs`)."""
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
    _validate_preference_stage(cfg)
    _validate_rl_stage(cfg)
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


def _validate_preference_stage(cfg: TrainConfig) -> None:
    if cfg.dpo.loss_type == "ipo" and cfg.dpo.label_smoothing:
        raise ConfigError("key 'dpo.label_smoothing' applies to loss_type sigmoid; IPO has none, set it to 0")
    if cfg.stage not in ("rm", "dpo"):
        return
    command = STAGE_COMMANDS[cfg.stage]
    if cfg.peft.type is not None or cfg.quantization.load_in_4bit:
        raise ConfigError(f"{command} trains every weight; set peft.type=null and quantization.load_in_4bit=false")
    if cfg.stage == "rm" and cfg.generate_samples:
        raise ConfigError("key 'generate_samples' is set, but a reward model does not generate; set it to []")
    if cfg.generate_val_samples:
        raise ConfigError(f"key 'generate_val_samples' is set, but {command} has no validation conversations to "
                          "answer, only ranked replies; set it to 0")
    if cfg.use_system_prefix:
        raise ConfigError(f"key 'use_system_prefix' is true, but {command} reads each comparison's own system "
                          "message (preference_jsonl's messages); set it to false")
    if cfg.stage == "dpo" and cfg.residual_dropout:
        raise ConfigError(f"key 'residual_dropout' is {cfg.residual_dropout}, but DPO's reference log-probabilities "
                          "are the starting policy's without dropout, so the margins would not start at 0; set "
                          "residual_dropout=0")


def _validate_rl_stage(cfg: TrainConfig) -> None:
    ppo = cfg.ppo
    if not 0 <= ppo.min_new_tokens <= ppo.max_new_tokens:
        raise ConfigError(f"key 'ppo.min_new_tokens' must be in [0, {ppo.max_new_tokens}], got {ppo.min_new_tokens}; "
                          "it cannot exceed ppo.max_new_tokens")
    _validate_grpo(cfg)
    if cfg.stage != "rl":
        return
    if not cfg.deepspeed:
        raise ConfigError("trainer_rl.py trains the policy and the value model on DeepSpeed; drop deepspeed=false")
    if cfg.peft.type is not None or cfg.quantization.load_in_4bit:
        raise ConfigError("trainer_rl.py trains every weight; set peft.type=null and quantization.load_in_4bit=false")
    if cfg.residual_dropout:
        raise ConfigError(f"key 'residual_dropout' is {cfg.residual_dropout}, but PPO's ratio to the rollout policy "
                          "and the KL to the reference are taken without dropout; set residual_dropout=0")
    if cfg.generate_samples or cfg.generate_val_samples:
        raise ConfigError("keys 'generate_samples' and 'generate_val_samples' are set, but trainer_rl.py logs its own "
                          "samples of each logged step (ppo.samples_to_log); set them to [] and 0")
    if cfg.model_config is not None:
        raise ConfigError("key 'model_config' is set, but PPO starts from a trained policy, which is also its frozen "
                          "reference; set model_name to an SFT export, checkpoint or run folder")
    for key in ("ppo.reward_model", "ppo.value_model"):
        folder = _local_folder(cfg, key)
        if folder is not None and not is_training_run(folder) and not (folder / "config.json").is_file():
            raise ConfigError(f"key '{key}': the folder {folder} has no config.json; expected a reward model saved by "
                              "export_model.py, or a trainer_rm.py checkpoint or run folder")
    if ppo.prompt_file is None and not cfg.dataset_specs:
        raise ConfigError("trainer_rl.py needs prompts: set 'ppo.prompt_file' or 'datasets'")


def _validate_grpo(cfg: TrainConfig) -> None:
    grpo = cfg.grpo
    if not math.isfinite(grpo.reward_model_weight):
        raise ConfigError(f"key 'grpo.reward_model_weight' must be a finite number, got {grpo.reward_model_weight}")
    if cfg.stage == "rl" and cfg.rl_algorithm == "grpo" and not grpo.reward_functions and not cfg.ppo.reward_model:
        raise ConfigError("GRPO needs rewards: set 'grpo.reward_functions' (e.g. [{function: "
                          "'model_training.training.rewards:exact_answer'}]) or 'ppo.reward_model'")


def _validate_peft(cfg: TrainConfig) -> None:
    if cfg.peft.target_modules is not None and not cfg.peft.target_modules:
        raise ConfigError("key 'peft.target_modules' is an empty list; name the layers or use null for the defaults")
    if cfg.quantization.load_in_4bit and cfg.peft.type is None:
        raise ConfigError(
            "key 'quantization.load_in_4bit' is true but 'peft.type' is null: 4-bit weights cannot be trained "
            "directly; set peft.type=lora (QLoRA)"
        )


_DATASET_KEYS = ("datasets", "datasets_extra")


def parse_dataset_specs(cfg: TrainConfig, origins: dict[str, str]) -> list[DatasetSpec]:
    """`datasets` + `datasets_extra` as typed specs, each validated against its source's schema; `origins` says
    where each list was set (" in section 's' of FILE"; none: the command line), for the messages."""
    specs: list[DatasetSpec] = []
    for key in _DATASET_KEYS:
        specs += _parse_dataset_entries(getattr(cfg, key), key, origins.get(key, ""))
    return specs


def _parse_dataset_entries(entries: Any, key: str, origin: str) -> list[DatasetSpec]:
    if not isinstance(entries, (list, tuple)) and not OmegaConf.is_list(entries):
        raise ConfigError(f"key '{key}'{origin} must be a list of datasets, got {entries!r}")
    specs = []
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]{origin}"
        if OmegaConf.is_config(entry):
            entry = OmegaConf.to_container(entry)
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            name, options = next(iter(entry.items()))
            options = options or {}
        else:
            raise ConfigError(f"{where} must be a dataset name or {{name: {{options}}}}, got {entry!r}")
        if name not in SOURCES:
            raise ConfigError(
                f"unknown dataset '{name}' in {where}; known: {', '.join(SOURCES)}{closest_name(name, list(SOURCES))}"
            )
        schema = SOURCES[name].options
        if not isinstance(options, dict):
            raise ConfigError(f"options of dataset '{name}' in {where} must be a mapping, got {options!r}")
        merged = _merge(OmegaConf.structured(schema), options, schema, f"of dataset '{name}' in {where}")
        typed = OmegaConf.to_object(merged)
        _validate_dataset(typed, f"dataset '{name}' in {where}")
        specs.append(DatasetSpec(name, typed))
    return specs


def _validate_dataset(options: DatasetConfig, where: str) -> None:
    if not 0.0 <= options.val_split < 1.0:
        raise ConfigError(f"'val_split' of {where} must be in [0, 1), got {options.val_split}")
    chosen = [k for k in ("fraction", "size", "share") if getattr(options, k) is not None]
    if len(chosen) > 1:
        raise ConfigError(f"{where} sets {' and '.join(chosen)}; set at most one of fraction, size and share")
    if options.fraction is not None and options.fraction <= 0:
        raise ConfigError(f"'fraction' of {where} must be positive, got {options.fraction}")
    if options.size is not None and options.size < 1:
        raise ConfigError(f"'size' of {where} must be at least 1, got {options.size}")
    if options.share is not None and not 0.0 < options.share < 1.0:
        raise ConfigError(f"'share' of {where} must be in (0, 1), got {options.share}")
    if not options.input_file_path:
        raise ConfigError(f"{where} needs 'input_file_path'")


def read_run_config(path: Path) -> TrainConfig:
    """The merged config a run saved (its `config.yaml`), typed; ConfigError when it does not fit the schema."""
    try:
        saved = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the run config {path}: {err}") from None
    merged = _merge(OmegaConf.structured(TrainConfig), saved, TrainConfig, f"in {path}")
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_yaml(cfg: TrainConfig) -> str:
    """The merged config as YAML, in schema order (what `--show_config` prints and each run saves)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def resolve_input_path(path: str) -> Path:
    """An input path from a config: absolute stays, relative resolves against the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p
