"""The schema: every key of a training config, its type, its default and one line on what it does.

`TrainConfig` and the dataclasses of its nested sections are the user's manual (the field docstrings); the
package's docstring (__init__.py) says how sections merge and how paths and model names are read. This module is
the bottom of the package but for datasets.py (the typed `datasets` entries): checks.py and loading.py import it,
and it imports neither. Also here: the project's folders, the rule for input
paths (`resolve_input_path`) and the config as YAML (`to_yaml`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from model_training.config.datasets import DatasetSpec, parse_dataset_specs

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
"""Every `*.yaml` file here contributes config sections."""
DEFAULT_CONFIG_FILE = CONFIG_DIR / "config.yaml"


# ---------------------------------------------------------------------------------------------------------------
# Datasets. Each entry of `datasets:` is `{name: {options}}` (or a bare name when every option has a default); the
# name picks a source of model_training/data/sources/ (`SOURCES`), whose options dataclass is that entry's schema.


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
    model from preference pairs) or rl (PPO or GRPO); null: the command's (trainer_sft.py, trainer_rm.py,
    trainer_dpo.py, trainer_rl.py; model_training/stages.py). A section that sets it runs with its own command only."""
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


def to_yaml(cfg: TrainConfig) -> str:
    """The merged config as YAML, in schema order (what `--show_config` prints and each run saves)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def resolve_input_path(path: str) -> Path:
    """An input path from a config: absolute stays, relative resolves against the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p
