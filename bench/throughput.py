"""Training throughput on one GPU: the transformers Trainer baseline against our trainer, Falcon-7B and Llama rows.

    python bench/throughput.py --out BENCH.md            # one GPU (scripts/gpu_check.sh runs it there)
    python bench/throughput.py --smoke                   # the same plumbing on the CPU: tiny shapes, a few steps

Rows, each a fresh process under `deepspeed --num_gpus 1`, so that its start-up and peak memory are its own:
  baseline          Falcon-7B width cut to 8 of 32 layers (hidden 4544, 71 heads, multi-query, parallel
                    attention, vocabulary 65024: 1.95B parameters, random weights built on the GPU), bf16, ZeRO-2
                    (configs/zero_config.json less its optimizer section, so that the Trainer's fused PyTorch
                    AdamW steps it, as ours), gradient checkpointing, SDPA, micro batch 4 x accumulation 4;
                    `transformers.Trainer` with DeepSpeed, each micro-batch padded to its longest sample.
  ours              the same model, data, batch and DeepSpeed config through our command line (trainer_sft.py
                    --configs defaults falcon-7b ...), with its defaults (packing, chunked loss): like for like.
  baseline-best     the baseline at its fastest setting that fits: micro batch 16 x accumulation 1, no
                    checkpointing (the same 16 samples per optimizer step).
  ours-best         ours at its fastest: micro batch 16 x accumulation 1 (one packed row per step), no
                    checkpointing, decoder layers compiled (torch_compile).
  llama             a Llama-shaped proxy beside the Falcon rows: Llama-7B width cut to 8 of 32 layers (hidden 4096,
                    32 query heads sharing 8 key/value heads, SwiGLU MLP 11008 wide, vocabulary 32000: 1.68B
                    parameters), our trainer with section llama-7b on the same data, batch and settings as `ours`
                    (bf16, ZeRO-2, checkpointing), packed through transformers' AttentionInterface.
  rm                the reward model (trainer_rm.py, sections defaults-rm falcon-7b-rm) on the Falcon proxy: pairs of
                    the same draw (one prompt, the replies of two samples), half as many pairs a micro-batch as `ours`
                    has samples, so that a micro-batch holds as many tokens; bf16, ZeRO-2, checkpointing.
  dpo               DPO (trainer_dpo.py, sections defaults-dpo falcon-7b-dpo) on the same pairs and settings; its
                    reference pass (one forward over every pair) runs before step 1, so it counts in the time to
                    the first step, not in tokens/s.
  ppo               PPO (trainer_rl.py, sections defaults alfred-40b-ppo) on the Falcon proxy: the policy and the value
                    model trained (ZeRO-2), the frozen reference and reward model whole in bf16, all four 1.95B, from
                    random-weight folders the bench saves; prompts are the draw's conversations up to the reply.
                    Two figures: rollout tokens/s (continuation tokens sampled per second of generation) and train
                    tokens/s (prompt and continuation tokens through the policy's and the value model's optimizer
                    steps per second of training), each the mean over the steps after the first.
  grpo              GRPO (trainer_rl.py, section defaults-grpo) on the same policy folder: the policy alone trained
                    (ZeRO-2), no value model, no reference (kl_coef 0) and no reward model; groups of 8
                    continuations of the draw's prompts rewarded by a length penalty (rewards:length_penalty).
                    The same two figures as `ppo`.
  7b-zero3-offload  the full 32-layer Falcon-7B shape (6.9B parameters), our trainer on ZeRO-3 with the optimizer
                    (fp32 master weights and Adam moments) in CPU memory: configs/zero3_offload_config.json less
                    its parameter offload. Answers "can it be fine-tuned on one 80 GB GPU".
  7b-qlora          the same shape, our trainer with section falcon-7b-qlora (LoRA r 64 on a 4-bit NF4 base,
                    ZeRO-2), on the same data and max_length 2048; its peak memory is compared with the row above.

Data: one synthetic set for every row, drawn from a seeded generator: sample lengths log-normal (median 300,
sigma 0.8, redrawn outside 16..2048), each sample one prompt and one reply, the reply (and its closing eos)
supervised, 35-75% of the tokens. Our trainer reads text, not ids, so the bench writes a `chat_jsonl` file
whose words are the tokens of a word-level tokenizer it also writes (one word, one id; 65021 words + the 3 chat
tokens the trainer adds = Falcon's 65024 rows): the trainer tokenizes the file into exactly the ids and labels
drawn, which the bench checks (and so warms the tokenized-data cache), and the baseline reads those ids. The
Llama row reads the same draw of lengths and labels written with a vocabulary of 32000 (31997 words).

Measures: real (non-pad) tokens per second over the steps after `--warmup` (wall clock between the ends of
optimizer steps), MFU = 6 x parameters x real tokens/s / --peak-flops (790e12: H100 bf16 dense), peak GPU
memory (torch.cuda.max_memory_allocated), peak host RSS of the rank, time to first step (from launching the
process to the end of optimizer step 1, DeepSpeed's op builds excluded: they are built once before the rows).
Our trainer's numbers come from its own metrics.jsonl (`tokens`), stamped with wall time by a thin wrapper
around its command line (`--worker ours`); the trainer itself is not changed. While a row runs, its startup
phases (the lines with "startup:" that both workers log) are printed as they happen, so a row that runs out
of time shows where the time went.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
VOCAB = 65024
"""Falcon's embedding rows; the synthetic tokenizer has this many ids once the chat tokens are added."""
LLAMA_VOCAB = 32000
"""Llama's embedding rows, for the Llama-shaped row's tokenizer."""
EOS = "<|endoftext|>"
IGNORE_INDEX = -100
DEFAULT_ROWS = ("baseline", "ours", "baseline-best", "ours-best", "llama", "rm", "dpo", "ppo", "grpo",
                "7b-zero3-offload", "7b-qlora")


@dataclass(frozen=True)
class Shape:
    """A Falcon-7B-style decoder (parallel attention, one K/V head, rotary, no biases), or with `llama_mlp` (the
    width of its SwiGLU MLP) a Llama-style one with `kv_heads` key/value heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int = 1
    llama_mlp: int | None = None

    @property
    def vocab(self) -> int:
        return VOCAB if self.llama_mlp is None else LLAMA_VOCAB

    def model_config(self) -> dict[str, Any]:
        size = {"hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "vocab_size": self.vocab}
        if self.llama_mlp is not None:
            return {"model_type": "llama", **size, "num_key_value_heads": self.kv_heads,
                    "intermediate_size": self.llama_mlp}
        return {"model_type": "falcon", **size, "multi_query": True, "parallel_attn": True,
                "new_decoder_architecture": False, "bias": False, "alibi": False}


@dataclass(frozen=True)
class Settings:
    """Everything a run of the bench depends on; `--smoke` swaps in tiny values."""

    small: Shape = Shape(4544, 8, 71)
    full: Shape = Shape(4544, 32, 71)
    llama: Shape = Shape(4096, 8, 32, kv_heads=8, llama_mlp=11008)
    median: int = 300
    sigma: float = 0.8
    min_length: int = 16
    max_length: int = 2048
    samples: int = 1024
    micro_batch: int = 4
    accumulation: int = 4
    dtype: str = "bf16"
    steps: int = 10
    """Optimizer steps of the 8-layer rows; `warmup` of them are not timed."""
    steps_7b: int = 5
    warmup: int = 3
    warmup_7b: int = 2
    ppo_steps: int = 4
    ppo_rollouts: int = 32
    """Rollouts per PPO step, generated in one batch; the value model takes 8 optimizer steps over them (the card's)."""
    ppo_new_tokens: int = 128
    timeouts: dict[str, int] = field(default_factory=lambda: {
        "baseline": 90, "ours": 60, "baseline-best": 90, "ours-best": 120, "llama": 60, "rm": 60, "dpo": 75,
        "ppo": 150, "grpo": 120, "7b-zero3-offload": 150, "7b-qlora": 90,
    })
    """Seconds each row may take; a row that runs out is reported as timed out and the next one runs."""
    smoke: bool = False


SMOKE = Settings(
    small=Shape(64, 2, 4), full=Shape(64, 4, 4), llama=Shape(64, 2, 4, kv_heads=2, llama_mlp=176), median=40,
    max_length=128, samples=128, micro_batch=2, accumulation=2, dtype="fp32", steps=4, steps_7b=3, warmup=1,
    warmup_7b=1, ppo_steps=3, ppo_rollouts=8, ppo_new_tokens=16, timeouts=dict.fromkeys(DEFAULT_ROWS, 300), smoke=True,
)


# ---------------------------------------------------------------------------------------------------------------
# Data


def write_tokenizer(folder: Path, base_vocab: int) -> None:
    """A word-level tokenizer: `w1`..`w{base_vocab-1}` are ids 1.., `<|endoftext|>` is 0 (eos and pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, base_vocab)}}
    # An unknown word is an error (its unk token is not in the vocabulary), never a silent substitute.
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS).save_pretrained(folder)


def draw_conversations(settings: Settings, base_vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) pairs whose formatted lengths (the two texts plus 4 marker tokens) follow the
    truncated log-normal of `settings`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while len(lengths) < settings.samples:
        draw = np.rint(settings.median * np.exp(settings.sigma * rng.standard_normal(settings.samples)))
        lengths += [int(n) for n in draw if settings.min_length <= n <= settings.max_length]
    conversations = []
    for length in lengths[: settings.samples]:
        text = length - 4  # <|prompter|> prompt <eos> <|assistant|> reply <eos>
        reply = max(1, round(rng.uniform(0.35, 0.75) * text))
        ids = rng.integers(1, base_vocab, text).tolist()
        conversations.append((ids[: text - reply], ids[text - reply :]))
    return conversations


def expected_sample(prompt: list[int], reply: list[int], prompter: int, assistant: int) -> tuple[list[int], list[int]]:
    """The ids and labels of the OpenAssistant format (model_training/data/formatting.py) for one pair."""
    eos = 0
    ids = [prompter, *prompt, eos, assistant, *reply, eos]
    labels = [IGNORE_INDEX] * (len(prompt) + 3) + [*reply, eos]
    return ids, labels


@dataclass(frozen=True)
class Dataset:
    tokenizer: Path
    chat_jsonl: Path
    preference_jsonl: Path
    """The same draw as preference pairs, for the rm and dpo rows: sample 2k's prompt, its reply chosen, sample
    2k + 1's reply rejected."""
    samples: Path
    """npz: ids and labels concatenated, with offsets (the baseline's input)."""
    real_tokens: int
    supervised_share: float


def make_dataset(settings: Settings, workdir: Path, vocab: int) -> Dataset:
    """Write the tokenizer of `vocab` ids (the chat tokens included), the chat file our trainer reads and the ids
    the baseline reads into `workdir`. Every vocabulary gets the same draw of lengths and labels."""
    import numpy as np
    from transformers import AutoTokenizer

    from model_training.data.formatting import SPECIAL_TOKENS, prepare_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    base_vocab = vocab - len(SPECIAL_TOKENS)
    tokenizer_dir = workdir / "tokenizer"
    write_tokenizer(tokenizer_dir, base_vocab)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert len(tokenizer) == vocab, f"the synthetic tokenizer has {len(tokenizer)} ids, not {vocab}"
    prompter, assistant = tokenizer.convert_tokens_to_ids(["<|prompter|>", "<|assistant|>"])

    conversations = draw_conversations(settings, base_vocab)
    chat_jsonl = workdir / "synthetic_chat.jsonl"
    with open(chat_jsonl, "w", encoding="utf-8") as f:
        for prompt, reply in conversations:
            messages = [{"role": "user", "content": " ".join(f"w{i}" for i in prompt)},
                        {"role": "assistant", "content": " ".join(f"w{i}" for i in reply)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    preference_jsonl = workdir / "synthetic_preferences.jsonl"
    with open(preference_jsonl, "w", encoding="utf-8") as f:
        for (prompt, chosen), (_, rejected) in zip(conversations[0::2], conversations[1::2]):
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in prompt),
                                "chosen": " ".join(f"w{i}" for i in chosen),
                                "rejected": " ".join(f"w{i}" for i in rejected)}) + "\n")
    pairs = [expected_sample(p, r, prompter, assistant) for p, r in conversations]
    offsets = np.cumsum([0] + [len(ids) for ids, _ in pairs])
    samples = workdir / "synthetic_samples.npz"
    np.savez(samples, ids=np.concatenate([ids for ids, _ in pairs]).astype(np.int32),
             labels=np.concatenate([labels for _, labels in pairs]).astype(np.int32), offsets=offsets)
    supervised = sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in pairs)
    return Dataset(tokenizer_dir, chat_jsonl, preference_jsonl, samples, int(offsets[-1]),
                   supervised / int(offsets[-1]))


def check_trainer_reads_the_drawn_samples(argv: list[str], dataset: Dataset) -> None:
    """Our trainer's data path (config, tokenizer, registry) must give exactly the baseline's ids and labels.
    Running it here also fills the trainer's tokenized-data cache, as the baseline's ids come ready-made."""
    import numpy as np

    from model_training.cli import parse_train_args
    from model_training.data.prepare import prepare_data
    from model_training.models.builder import load_tokenizer

    cfg = parse_train_args(argv).config
    data = prepare_data(cfg, load_tokenizer(cfg))
    got = [s for split in data.train for s in split.samples]
    with np.load(dataset.samples) as arrays:
        ids, labels, offsets = arrays["ids"].tolist(), arrays["labels"].tolist(), arrays["offsets"].tolist()
    want = [(tuple(ids[a:b]), tuple(labels[a:b])) for a, b in zip(offsets, offsets[1:])]
    if [(s.input_ids, s.labels) for s in got] != want:
        raise SystemExit("the trainer tokenizes the synthetic chat file into other ids than drawn; fix the bench")


def prepare_datasets(settings: Settings, workdir: Path, rows: list[Row]) -> dict[int, Dataset]:
    """One data set per vocabulary that `rows` need, each checked against what our trainer reads from it."""
    datasets: dict[int, Dataset] = {}
    for row in rows:
        if row.shape.vocab not in datasets:
            dataset = make_dataset(settings, workdir / f"vocab-{row.shape.vocab}", row.shape.vocab)
            sft = replace(row, stage="sft", sections=("defaults", "falcon-7b"))
            check_trainer_reads_the_drawn_samples(trainer_argv(sft, settings, dataset, workdir), dataset)
            datasets[row.shape.vocab] = dataset
    return datasets


# ---------------------------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    name: str
    runner: str
    """hf (transformers.Trainer) or ours (trainer_sft.py's command line)."""
    shape: Shape
    setup: str
    steps: int
    warmup: int
    deepspeed_config: Path
    micro_batch: int
    accumulation: int
    checkpointing: bool = True
    overrides: tuple[str, ...] = ()
    sections: tuple[str, ...] = ("defaults", "falcon-7b")
    stage: str = "sft"
    """Our trainer's stage (ours): sft, rm, dpo or rl."""

    def output_dir(self, workdir: Path) -> Path:
        return workdir / "runs" / self.name


def offload_optimizer_only(workdir: Path) -> Path:
    """configs/zero3_offload_config.json with the optimizer in CPU memory and the parameters on the GPU."""
    ds = json.loads((REPO / "configs" / "zero3_offload_config.json").read_text())
    ds["zero_optimization"].pop("offload_param")
    path = workdir / "zero3_offload_optimizer.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def without_optimizer(workdir: Path) -> Path:
    """configs/zero_config.json less its optimizer section: the Trainer then steps its own optimizer (fused
    PyTorch AdamW, as ours) instead of DeepSpeed's FusedAdam, whose CUDA op would be JIT-built."""
    ds = json.loads((REPO / "configs" / "zero_config.json").read_text())
    ds.pop("optimizer")
    path = workdir / "zero2_trainer_optimizer.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def make_rows(settings: Settings, workdir: Path) -> dict[str, Row]:
    zero2 = REPO / "configs" / "zero_config.json"
    trainer_optimizer = without_optimizer(workdir)
    compute = "fp32" if settings.dtype == "fp32" else "bf16"
    # Like for like: the reference batch with checkpointing. Best: the same samples per optimizer step in one
    # micro-batch, no recomputation (each side's fastest setting that fits).
    like = {"micro_batch": settings.micro_batch, "accumulation": settings.accumulation, "checkpointing": True}
    best = {"micro_batch": settings.micro_batch * settings.accumulation, "accumulation": 1, "checkpointing": False}
    proxy = {"shape": settings.small, "steps": settings.steps, "warmup": settings.warmup}
    # A pair is two sequences: half as many a micro-batch hold as many tokens as `like`'s samples.
    pairs = {**like, "micro_batch": max(1, settings.micro_batch // 2)}
    seven_b = {"shape": settings.full, "steps": settings.steps_7b, "warmup": settings.warmup_7b}
    rows = [
        Row("baseline", "hf", setup="transformers.Trainer, padded, ZeRO-2", deepspeed_config=trainer_optimizer,
            **proxy, **like),
        Row("ours", "ours", setup="trainer_sft.py, ZeRO-2", deepspeed_config=zero2, **proxy, **like),
        Row("baseline-best", "hf", setup="transformers.Trainer, padded, ZeRO-2, one micro-batch a step, no "
            "checkpointing", deepspeed_config=trainer_optimizer, **proxy, **best),
        Row("ours-best", "ours", setup="trainer_sft.py, ZeRO-2, one micro-batch a step, no checkpointing, "
            "compiled layers", deepspeed_config=zero2, overrides=("torch_compile=true",), **proxy, **best),
        Row("llama", "ours", setup="trainer_sft.py, ZeRO-2, Llama-shaped (GQA 32/8, vocabulary 32000)",
            deepspeed_config=zero2, sections=("defaults", "llama-7b"), shape=settings.llama, steps=settings.steps,
            warmup=settings.warmup, **like),
        Row("rm", "ours", setup="trainer_rm.py, ZeRO-2, pairs", deepspeed_config=zero2, stage="rm",
            sections=("defaults-rm", "falcon-7b-rm"), **proxy, **pairs),
        Row("dpo", "ours", setup="trainer_dpo.py, ZeRO-2, pairs", deepspeed_config=zero2, stage="dpo",
            sections=("defaults-dpo", "falcon-7b-dpo"), **proxy, **pairs),
        Row("ppo", "ours", setup="trainer_rl.py, ZeRO-2, policy + value trained, reference + reward model frozen",
            deepspeed_config=zero2, stage="rl", sections=("defaults", "alfred-40b-ppo"), shape=settings.small,
            steps=settings.ppo_steps, warmup=1, micro_batch=max(1, settings.ppo_rollouts // 8), accumulation=1,
            overrides=("ppo.frozen_zero3=false", f"ppo.num_rollouts={settings.ppo_rollouts}",
                       f"ppo.rollout_batch_size={settings.ppo_rollouts}",
                       f"ppo.max_new_tokens={settings.ppo_new_tokens}",
                       f"ppo.max_prompt_length={settings.max_length}")),
        Row("grpo", "ours", setup="trainer_rl.py, rl_algorithm grpo, ZeRO-2, policy trained, groups of 8",
            deepspeed_config=zero2, stage="rl", sections=("defaults-grpo",), shape=settings.small,
            steps=settings.ppo_steps, warmup=1, micro_batch=max(1, settings.ppo_rollouts // 8), accumulation=1,
            overrides=("ppo.reward_model=null", f"ppo.num_rollouts={settings.ppo_rollouts}",
                       f"ppo.rollout_batch_size={settings.ppo_rollouts}",
                       f"ppo.max_new_tokens={settings.ppo_new_tokens}",
                       f"ppo.max_prompt_length={settings.max_length}", "grpo.group_size=8",
                       "grpo.reward_functions=[{function: 'model_training.training.rewards:length_penalty', "
                       "options: {max_chars: 200}}]")),
        Row("7b-zero3-offload", "ours", setup="trainer_sft.py, ZeRO-3, optimizer offloaded to CPU",
            deepspeed_config=offload_optimizer_only(workdir), **seven_b, **like),
        # Section falcon-7b-qlora, on the bench's data: its format, length and batch are the other rows'.
        Row("7b-qlora", "ours", setup="trainer_sft.py, QLoRA (NF4 base, LoRA r 64), ZeRO-2", deepspeed_config=zero2,
            overrides=("chat_format=openassistant", f"quantization.compute_dtype={compute}"),
            sections=("defaults", "falcon-7b-qlora"), **seven_b, **like),
    ]
    return {row.name: row for row in rows}


def trainer_argv(row: Row, settings: Settings, dataset: Dataset, workdir: Path) -> list[str]:
    """Our trainer's command line for `row`: a config section, then the bench's model, data and batch."""
    model = ["model_name=null", *(f"model_config.{key}={json.dumps(value)}" for key, value in
                                  row.shape.model_config().items()), f"tokenizer_name={dataset.tokenizer}"]
    if row.stage == "rl":  # PPO and GRPO start from saved models (`save_ppo_models`)
        model = [f"model_name={workdir / 'ppo-policy'}", "model_config=null", "tokenizer_name=null",
                 f"ppo.reward_model={workdir / 'ppo-reward'}"]
    source, path = ("chat_jsonl", dataset.chat_jsonl) if row.stage in ("sft", "rl") else (
        "preference_jsonl", dataset.preference_jsonl)
    return [
        "--configs", *row.sections, *model,
        f"datasets=[{{{source}: {{input_file_path: {path}, val_split: 0.0}}}}]",
        f"data_cache_dir={workdir / 'tokenized'}", f"output_dir={row.output_dir(workdir)}",
        f"max_length={settings.max_length}", f"max_steps={row.steps}", "logging_steps=1", "save_strategy=no",
        "eval_steps=null", "residual_dropout=0.0", "generate_val_samples=0", "log_wandb=false",
        f"dtype={settings.dtype}", f"gradient_checkpointing={str(row.checkpointing).lower()}",
        f"deepspeed_config={row.deepspeed_config}", f"per_device_train_batch_size={row.micro_batch}",
        f"gradient_accumulation_steps={row.accumulation}", *row.overrides,
    ]


def save_ppo_models(shape: Shape, dataset: Dataset, workdir: Path, dtype: str) -> None:
    """The ppo row's starting points, random weights with the bench's tokenizer: a causal LM (the policy, also the
    reference) in workdir/ppo-policy and a sequence classifier with one score (the reward model, also the value
    model's start) in workdir/ppo-reward. Built on the CPU: the parent holds no CUDA context."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from model_training.data.formatting import prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(dataset.tokenizer))
    options = shape.model_config()
    for name, auto, head in (("ppo-policy", AutoModelForCausalLM, {}),
                             ("ppo-reward", AutoModelForSequenceClassification, {"num_labels": 1})):
        folder = workdir / name
        config = AutoConfig.for_model(options["model_type"], **{k: v for k, v in options.items() if k != "model_type"},
                                      pad_token_id=tokenizer.pad_token_id, **head)
        torch.manual_seed(0)
        auto.from_config(config, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def count_parameters(shape: Shape) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    options = shape.model_config()
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # the tied output head counts once


# ---------------------------------------------------------------------------------------------------------------
# Workers: run inside the deepspeed launcher, write what they measured to --result.


def _peaks() -> dict[str, float]:
    import torch

    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"peak_gpu_bytes": peak_gpu, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def worker_ours(result: Path, argv: list[str], stage: str) -> None:
    """Our trainer's command line (of `stage`), its metrics records stamped with seconds since the bench launched
    it."""
    from model_training.cli import exit_process, main_train
    from model_training.training.metrics import MetricsLogger

    launched = float(os.environ["BENCH_T0"])
    log = MetricsLogger.log

    def stamped(self: MetricsLogger, record: dict[str, Any]) -> None:
        log(self, {**record, "wall_s": time.time() - launched})

    MetricsLogger.log = stamped  # type: ignore[method-assign]
    status = main_train(argv, stage)
    result.write_text(json.dumps({"status": status, **_peaks()}))
    exit_process(status)


def worker_baseline(result: Path, spec_path: Path) -> None:
    """The baseline: transformers.Trainer with DeepSpeed on the bench's ids, micro-batches padded to the longest."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    launched = float(os.environ["BENCH_T0"])
    spec = json.loads(spec_path.read_text())
    with np.load(spec["samples"]) as arrays:
        ids, labels, offsets = arrays["ids"], arrays["labels"], arrays["offsets"]
    samples = [(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]

    def collate(batch: list[tuple[Any, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(i) for i, _ in batch)
        out = {
            "input_ids": torch.zeros(len(batch), longest, dtype=torch.long),  # pad = eos = 0
            "attention_mask": torch.zeros(len(batch), longest, dtype=torch.long),
            "labels": torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (i, lab) in enumerate(batch):
            out["input_ids"][row, : len(i)] = torch.from_numpy(i.astype(np.int64))
            out["attention_mask"][row, : len(i)] = 1
            out["labels"][row, : len(i)] = torch.from_numpy(lab.astype(np.int64))
        return out

    class CountingTrainer(Trainer):
        """Counts the real tokens of every micro-batch it trains on (kept on the device: no extra sync)."""

        real_tokens: Any = 0

        def training_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001, ANN201 - Trainer's signature
            self.real_tokens = self.real_tokens + inputs["attention_mask"].sum()
            return super().training_step(model, inputs, *args, **kwargs)

    steps: list[dict[str, float]] = []
    phase_start = time.time()

    def phase(name: str) -> None:
        nonlocal phase_start
        print(f"startup: {name} {time.time() - phase_start:.1f} s", flush=True)
        phase_start = time.time()

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - callback signature
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps.append({"step": state.global_step, "tokens": int(trainer.real_tokens),
                          "wall_s": time.time() - launched})
            if state.global_step == 1:
                phase("first optimizer step")

    print(f"startup: process start and imports {time.time() - launched:.1f} s", flush=True)
    options = dict(spec["model_config"])
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    torch.manual_seed(42)
    cuda = torch.cuda.is_available()
    # Built on the GPU, as ours: the rows compare steady rates, not how long a CPU takes to initialize.
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    phase("model build")
    args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["accumulation"], max_steps=spec["steps"], learning_rate=1e-5,
        weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="constant",
        optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=spec["dtype"] == "bf16",
        gradient_checkpointing=spec["checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=spec["deepspeed_config"], logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=42, use_cpu=not cuda,
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=samples, data_collator=collate,
                              callbacks=[StepClock()])
    if not trainer.is_deepspeed_enabled or model.config._attn_implementation != "sdpa":
        raise SystemExit("the baseline must run on DeepSpeed with SDPA attention; transformers set up otherwise")
    phase("trainer init")
    trainer.train()
    result.write_text(json.dumps({"status": 0, "steps": steps, **_peaks()}))


# ---------------------------------------------------------------------------------------------------------------
# The parent: data, rows, table.


@dataclass
class Outcome:
    row: str
    setup: str
    parameters: int
    status: str = "ok"
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gpu_gib: float | None = None
    peak_rss_gib: float | None = None
    first_step_s: float | None = None
    rollout_tokens_per_s: float | None = None
    """The ppo row's: continuation tokens sampled per second of generation."""
    seconds: float = 0.0
    log: str = ""


def steady_rate(steps: list[dict[str, float]], warmup: int) -> tuple[float | None, float | None]:
    """(real tokens/s after the first `warmup` steps (at least 1), seconds to the end of step 1) from per-step
    records of cumulative `tokens` and `wall_s`."""
    steps = sorted(steps, key=lambda s: s["step"])
    if not steps:
        return None, None
    first = steps[0]["wall_s"]
    if len(steps) <= warmup:
        return None, first
    start, end = steps[warmup - 1], steps[-1]
    return (end["tokens"] - start["tokens"]) / (end["wall_s"] - start["wall_s"]), first


def ppo_rates(steps: list[dict[str, float]], warmup: int) -> tuple[float | None, float | None, float | None]:
    """(train tokens/s, rollout tokens/s, seconds to the end of step 1) of a PPO run: the means of its per-step rates
    after the first `warmup` steps."""
    steps = sorted(steps, key=lambda s: s["step"])
    first = steps[0]["wall_s"] if steps else None
    timed = steps[warmup:]
    if not timed:
        return None, None, first
    return (sum(s["train_tokens_per_s"] for s in timed) / len(timed),
            sum(s["rollout_tokens_per_s"] for s in timed) / len(timed), first)


def run_row(row: Row, settings: Settings, dataset: Dataset, workdir: Path, env: dict[str, str],
            timeout: float, peak_flops: float, parameters: int) -> Outcome:
    from model_training.layout import METRICS

    outcome = Outcome(row.name, row.setup, parameters)
    result = workdir / f"{row.name}.result.json"
    result.unlink(missing_ok=True)
    output_dir = row.output_dir(workdir)
    shutil.rmtree(output_dir, ignore_errors=True)  # metrics.jsonl appends: an earlier run's lines must go
    if row.runner == "hf":
        spec = workdir / f"{row.name}.spec.json"
        spec.write_text(json.dumps({
            "samples": str(dataset.samples), "model_config": row.shape.model_config(), "dtype": settings.dtype,
            "micro_batch": row.micro_batch, "accumulation": row.accumulation, "checkpointing": row.checkpointing,
            "steps": row.steps,
            "deepspeed_config": str(row.deepspeed_config), "output_dir": str(output_dir),
        }))
        worker = ["--worker", "hf", "--result", str(result), "--", str(spec)]
    else:
        worker = ["--worker", "ours", "--stage", row.stage, "--result", str(result), "--",
                  *trainer_argv(row, settings, dataset, workdir)]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
               str(_free_port()), str(Path(__file__).resolve()), *worker]
    log_path = workdir / f"{row.name}.log"
    outcome.log = str(log_path)
    start = time.time()
    with open(log_path, "w") as log:
        # A session of its own: on a timeout the launcher and its rank go together, and free the GPU.
        process = subprocess.Popen(command, cwd=REPO, env={**env, "BENCH_T0": repr(start)}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        returncode = _wait_printing_phases(process, log_path, row.name, start + timeout)
    outcome.seconds = time.time() - start
    text = log_path.read_text(errors="replace")
    if returncode is None:
        outcome.status = f"timed out after {timeout:.0f} s"
    elif returncode != 0 or not result.exists():
        if "out of memory" in text.lower():
            outcome.status = "out of memory"
        elif "exits with return code = -9" in text:
            outcome.status = "killed (SIGKILL: host memory?)"
        else:
            outcome.status = f"failed (exit {returncode})"
    measured = json.loads(result.read_text()) if result.exists() else {}
    # Our trainer's metrics are on disk step by step: a row stopped early still tells its rate so far.
    steps = measured["steps"] if row.runner == "hf" and measured else _metrics_steps(output_dir / METRICS)
    if row.stage == "rl":
        outcome.tokens_per_s, outcome.rollout_tokens_per_s, outcome.first_step_s = ppo_rates(steps, row.warmup)
    else:
        outcome.tokens_per_s, outcome.first_step_s = steady_rate(steps, row.warmup)
    if measured.get("peak_gpu_bytes") is not None:
        outcome.peak_gpu_gib = measured["peak_gpu_bytes"] / GIB
    if measured:
        outcome.peak_rss_gib = measured["peak_rss_bytes"] / GIB
    if outcome.tokens_per_s is not None:
        outcome.mfu = 6 * parameters * outcome.tokens_per_s / peak_flops
    return outcome


def _wait_printing_phases(process: subprocess.Popen, log_path: Path, row: str, deadline: float) -> int | None:
    """Wait for a row's process, printing its startup phases as they reach its log; kill it at `deadline`.

    Returns its exit status, or None when it ran out of time.
    """
    printed = 0
    while True:
        try:
            returncode: int | None = process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            returncode = None
        lines = log_path.read_text(errors="replace").splitlines()
        for line in lines[printed:]:
            if "startup:" in line:
                print(f"[bench] {row}: {line[line.index('startup:'):]}", flush=True)
        printed = len(lines)
        if returncode is not None:
            return returncode
        if time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def _metrics_steps(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "tokens" in r and "wall_s" in r]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prebuild_ops(env: dict[str, str]) -> str:
    """Build DeepSpeed's CPU Adam (the offloaded optimizer's; the others step PyTorch's AdamW) once before the
    rows, so that no row's time to first step pays the JIT build, with the arch list the trainer would use."""
    from model_training.training.ds_config import clean_cuda_arch_list

    clean_cuda_arch_list(env)
    code = (
        "from deepspeed.accelerator import get_accelerator\n"
        "builder = get_accelerator().create_op_builder('CPUAdamBuilder')\n"
        "if builder is not None and builder.is_compatible():\n"
        "    builder.load()\n"
    )
    start = time.time()
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    status = "ok" if process.returncode == 0 else f"failed: {process.stderr.strip().splitlines()[-1:]}"
    return f"{status}, {time.time() - start:.0f} s"


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def table(outcomes: list[Outcome]) -> str:
    baseline = next((o.tokens_per_s for o in outcomes if o.row == "baseline"), None)
    lines = [
        "| row | setup | parameters | real tokens/s | MFU (real tokens) | peak GPU memory | peak host RSS "
        "| time to first step | tokens/s vs baseline | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for o in outcomes:
        ratio = o.tokens_per_s / baseline if o.tokens_per_s and baseline else None
        lines.append(
            f"| {o.row} | {o.setup} | {o.parameters / 1e9:.3f}B | {_fmt(o.tokens_per_s, '{:,.0f}')} "
            f"| {_fmt(o.mfu and 100 * o.mfu, '{:.1f}%')} | {_fmt(o.peak_gpu_gib, '{:.1f} GiB')} "
            f"| {_fmt(o.peak_rss_gib, '{:.1f} GiB')} | {_fmt(o.first_step_s, '{:.0f} s')} "
            f"| {_fmt(ratio, '{:.2f}x')} | {o.status} |"
        )
    full = {o.row: o for o in outcomes}
    lines.append("")
    for ours, theirs, what in (("ours", "baseline", "like for like (micro batch 4 x accumulation 4, checkpointing)"),
                               ("ours-best", "baseline-best", "each side's best setting")):
        a, b = full.get(ours), full.get(theirs)
        if a and b and a.tokens_per_s and b.tokens_per_s:
            lines.append(f"- {what}: {ours} {a.tokens_per_s / b.tokens_per_s:.2f}x {theirs}'s real tokens/s "
                         f"(target 4x), at {100 * a.mfu:.1f}% MFU (target 40%).")
    llama, ours = full.get("llama"), full.get("ours")
    if llama and ours and llama.tokens_per_s and ours.tokens_per_s:
        lines.append(f"- Llama-shaped proxy, the settings of `ours`: {llama.tokens_per_s:,.0f} real tokens/s at "
                     f"{100 * llama.mfu:.1f}% MFU (the Falcon proxy: {ours.tokens_per_s:,.0f} at "
                     f"{100 * ours.mfu:.1f}%).")
    for stage, what in (("ppo", "four models of its size on one GPU"), ("grpo", "the policy alone")):
        rl = full.get(stage)
        if rl and rl.tokens_per_s and rl.rollout_tokens_per_s:
            lines.append(f"- {stage} on the Falcon proxy ({what}): rollout {rl.rollout_tokens_per_s:,.0f} generated "
                         f"tokens/s, train {rl.tokens_per_s:,.0f} tokens/s at {100 * rl.mfu:.1f}% MFU.")
    for stage in ("rm", "dpo"):
        row = full.get(stage)
        if row and ours and row.tokens_per_s and ours.tokens_per_s:
            ratio = row.tokens_per_s / ours.tokens_per_s
            lines.append(f"- {stage} on the Falcon proxy, the settings of `ours` in pairs: {row.tokens_per_s:,.0f} "
                         f"real tokens/s at {100 * row.mfu:.1f}% MFU, {ratio:.2f}x SFT's.")
    offload, qlora = full.get("7b-zero3-offload"), full.get("7b-qlora")
    if offload and qlora and offload.peak_gpu_gib and qlora.peak_gpu_gib:
        lines.append(f"- QLoRA peak GPU memory on the 32-layer Falcon-7B shape: {qlora.peak_gpu_gib:.1f} GiB, "
                     f"{qlora.peak_gpu_gib / offload.peak_gpu_gib:.2f}x full fine-tuning's "
                     f"{offload.peak_gpu_gib:.1f} GiB (ZeRO-3, optimizer offloaded).")
    return "\n".join(lines)


def environment(smoke: bool) -> str:
    """Date, device and versions, for the record."""
    versions = []
    for name in ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "accelerate"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    device = "CPU (smoke: plumbing only, no figure means anything)" if smoke else _gpu_name()
    return (f"{datetime.date.today().isoformat()}; {device}; Python {platform.python_version()}; "
            + ", ".join(versions))


def _gpu_name() -> str:
    # nvidia-smi rather than torch.cuda: a CUDA context in this parent would hold GPU memory during the rows.
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown GPU (nvidia-smi failed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (DS_ACCELERATOR=cpu)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated, in order")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/throughput-bench"))
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here, after every row")
    parser.add_argument("--peak-flops", type=float, default=790e12, help="the device's dense bf16 FLOP/s")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all rows; later rows get less")
    parser.add_argument("--worker", choices=["hf", "ours"], help=argparse.SUPPRESS)  # a row's own process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="sft", help=argparse.SUPPRESS)
    # The deepspeed launcher passes it to every rank; the workers read LOCAL_RANK from the environment instead.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.worker == "ours":
        worker_ours(args.result, rest, args.stage)
        return
    if args.worker == "hf":
        worker_baseline(args.result, Path(rest[0]))
        return

    started = time.time()
    settings = SMOKE if args.smoke else Settings()
    rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}
    if settings.smoke:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    args.workdir.mkdir(parents=True, exist_ok=True)
    all_rows = make_rows(settings, args.workdir)
    unknown = [r for r in rows if r not in all_rows]
    if unknown or not rows:
        raise SystemExit(f"unknown rows {unknown or 'none given'}; known: {', '.join(all_rows)}")
    datasets = prepare_datasets(settings, args.workdir, [all_rows[name] for name in rows])
    dataset = next(iter(datasets.values()))  # the same lengths and labels in each vocabulary
    if "ppo" in rows or "grpo" in rows:  # both start from the saved policy
        save_ppo_models(all_rows["ppo"].shape, datasets[all_rows["ppo"].shape.vocab], args.workdir, settings.dtype)
    header = [
        f"# Throughput ({'CPU smoke' if settings.smoke else 'GPU'})",
        "",
        environment(settings.smoke),
        "",
        f"Data: {settings.samples} synthetic samples, {settings.min_length}..{settings.max_length} tokens, "
        f"log-normal (median {settings.median}, sigma {settings.sigma}), {dataset.real_tokens / settings.samples:.0f} "
        f"tokens on average, {100 * dataset.supervised_share:.0f}% supervised; micro batch {settings.micro_batch} "
        f"x accumulation {settings.accumulation}, {settings.dtype}; tokens/s over steps after the first "
        f"{settings.warmup} ({settings.warmup_7b} for 7B rows) of {settings.steps} ({settings.steps_7b}); "
        f"MFU = 6 x parameters x real tokens/s / {args.peak_flops:.3g} (for QLoRA too, whose frozen base gets no "
        "weight gradients: there it overstates the work done).",
        f"DeepSpeed op builds before the rows: {prebuild_ops(env)}.",
        "",
        "",
    ]
    outcomes: list[Outcome] = []
    report = "\n".join(header)
    for name in rows:
        row = all_rows[name]
        timeout = settings.timeouts[name]
        if args.budget is not None:
            timeout = min(timeout, args.budget - (time.time() - started))
        if timeout < 30:
            outcomes.append(Outcome(name, row.setup, count_parameters(row.shape), status="skipped (no time left)"))
            continue
        print(f"[bench] {name}: {row.setup} (at most {timeout:.0f} s)", flush=True)
        outcome = run_row(row, settings, datasets[row.shape.vocab], args.workdir, env, timeout, args.peak_flops,
                          count_parameters(row.shape))
        print(f"[bench] {name}: {outcome.status} in {outcome.seconds:.0f} s (log: {outcome.log})", flush=True)
        outcomes.append(outcome)
        report = "\n".join(header) + table(outcomes) + "\n"
        if args.out:
            args.out.write_text(report)
            args.out.with_suffix(".json").write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    print(report)


if __name__ == "__main__":
    main()
