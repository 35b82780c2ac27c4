"""The datasets a config names, loaded, split and tokenized into formatted samples.

A loader takes its typed options (model_training/config.py: DATASET_CONFIGS) and returns (train, val)
threads; `prepare_data` formats them with the conversation formatter and counts what it had to cut or drop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from model_training.config import ConfigError, TrainConfig, dataset_specs, resolve_input_path
from model_training.data.formatting import FormattedSample, format_conversation
from model_training.data.oasst import Thread, load_oasst_export

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedSplit:
    """One dataset's train or validation side, formatted; `dropped` lost every supervised token to truncation."""

    name: str
    samples: list[FormattedSample]
    threads: int
    turns: int
    truncated: int
    dropped: int


@dataclass(frozen=True)
class PreparedData:
    train: list[TokenizedSplit]
    val: list[TokenizedSplit]


def data_path(cfg: TrainConfig, path: str) -> Path:
    """A dataset file: absolute stays, relative resolves against `data_dir` (itself under the project root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else resolve_input_path(cfg.data_dir) / p


def _load_oasst_export(options: Any, cfg: TrainConfig, key: str) -> tuple[list[Thread], list[Thread]]:
    try:
        return load_oasst_export(
            data_path(cfg, options.input_file_path),
            lang=options.lang,
            top_k=options.top_k,
            val_split=options.val_split,
            manual_seed=options.manual_seed,
            skip_invalid=options.skip_invalid,
            config_key=f"{key}.input_file_path",
        )
    except FileNotFoundError as err:
        # The loader's message names the path and the config key; a user fixes it in the config.
        raise ConfigError(str(err)) from None


LOADERS: dict[str, Callable[[Any, TrainConfig, str], tuple[list[Thread], list[Thread]]]] = {
    "oasst_export": _load_oasst_export,
}
"""Dataset name -> loader; every name in DATASET_CONFIGS has one."""


def load_threads(cfg: TrainConfig) -> list[tuple[str, list[Thread], list[Thread]]]:
    """(display name, train threads, val threads) for each configured dataset, in config order."""
    specs = dataset_specs(cfg)
    if not specs:
        raise ConfigError("no datasets configured: add a data section (e.g. --configs ... oasst-sample)")
    loaded = []
    for index, (name, options) in enumerate(specs):
        key = f"datasets[{index}].{name}"
        train, val = LOADERS[name](options, cfg, key)
        if not train:
            raise ConfigError(
                f"dataset {key} has no training threads after its filters ({_describe(options)}); "
                "check the language list, top_k and the file"
            )
        display = name if sum(n == name for n, _ in specs) == 1 else f"{name}[{index}]"
        loaded.append((display, train, val))
    return loaded


def _describe(options: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in vars(options).items())


def tokenize_threads(
    name: str, threads: Sequence[Thread], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedSplit:
    samples, truncated, dropped = [], 0, 0
    for thread in threads:
        sample = format_conversation(thread, tokenizer, max_length)
        if sample is None:
            dropped += 1
            continue
        truncated += sample.truncated
        samples.append(sample)
    if dropped:
        logger.warning("%s: dropped %d conversations left with no supervised token by max_length", name, dropped)
    return TokenizedSplit(
        name=name,
        samples=samples,
        threads=len(threads),
        turns=sum(len(t) for t in threads),
        truncated=truncated,
        dropped=dropped,
    )


def prepare_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    train, val = [], []
    for name, train_threads, val_threads in load_threads(cfg):
        train.append(tokenize_threads(name, train_threads, tokenizer, cfg.max_length))
        val.append(tokenize_threads(name, val_threads, tokenizer, cfg.max_length))
    return PreparedData(train=train, val=val)
