"""The datasets a config names: loaded, split, deduplicated, filtered and tokenized into formatted samples.

For each entry of `datasets` + `datasets_extra` (`TrainConfig.dataset_specs`), in config order:
  1. find its input (`data_path`: a relative path in `cache_dir`, then in `data_dir`), and load its records split
     into train and validation through its source (model_training/data/sources/: each source splits by its own
     rule, OASST by message tree as the OpenAssistant trainer splits, the others by record);
  2. drop exact duplicates of conversations seen earlier, in this or an earlier dataset (`dedupe`);
  3. format each conversation (model_training/data/formatting.py) or cut each text into pieces, drop samples
     outside the dataset's `min_length`/`max_length`, then cut the rest to the global `max_length`.
The result of each dataset is kept in `data_cache_dir` and read back by later runs while everything it depends
on stays the same (model_training/data/cache.py). How much of each dataset an epoch draws is the sampler's
business (model_training/training/sampler.py). No source is named here: `SOURCES` is the one table of them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from model_training.config import ConfigError, TrainConfig, resolve_input_path
from model_training.data.cache import TokenizedCache, arrays_to_samples, describe_dataset, samples_to_arrays
from model_training.data.chat_formats import DEFAULT_CHAT_FORMAT
from model_training.data.formatting import FormattedSample, format_conversation, format_text, supervise_every_token
from model_training.data.records import Conversation, Record, TextDocument
from model_training.data.sources import SOURCES
from model_training.data.sources.common import DatasetConfig, FilterReport, LoadContext
from model_training.data.sources.rows import is_hub_dataset

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
    options: list[DatasetConfig] = field(default_factory=list)
    reports: list[FilterReport] = field(default_factory=list)
    cached: list[bool] = field(default_factory=list)
    """Per dataset: read from the tokenized-data cache rather than prepared."""


def dataset_folders(cfg: TrainConfig) -> list[Path]:
    """Where a relative `input_file_path` is looked up, in order: `cache_dir`, where the OpenAssistant trainer
    reads its datasets (so its published commands find their files), then `data_dir`."""
    folders = [Path(cfg.cache_dir).expanduser().absolute()] if cfg.cache_dir else []
    return [*folders, resolve_input_path(cfg.data_dir)]


def data_path(cfg: TrainConfig, name: str, path: str, config_key: str) -> str:
    """A dataset's source: an absolute path stays; a relative one becomes the first of it under `dataset_folders`
    that exists, or stays as it is when it is a hub id and the source reads the hub (`Source.hub`). ConfigError
    otherwise, naming every place tried and `config_key`."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    folders = dataset_folders(cfg)
    tried = [folder / p for folder in folders]
    found = next((candidate for candidate in tried if candidate.exists()), None)
    if found is not None:
        return str(found)
    if SOURCES[name].hub and all(is_hub_dataset(path, folder) for folder in folders):
        return path
    places = " or ".join(str(candidate) for candidate in tried)
    raise ConfigError(f"dataset file {path!r} (set by {config_key}) not found: tried {places}; a relative path is "
                      "looked up in cache_dir (when set), then in data_dir")


def _dedupe_key(record: Record) -> bytes:
    """A 16-byte digest of what makes two records duplicates; digests, unlike the texts, fit in the cache."""
    if isinstance(record, TextDocument):
        key: tuple = ("text", record.text.strip())
    else:
        key = (record.system, tuple((m.role, m.text.strip()) for m in record.messages))
    return hashlib.blake2b(repr(key).encode(), digest_size=16).digest()


def _dedupe(records: list[Record], seen: set[bytes] | None, report: FilterReport) -> list[Record]:
    """The records that repeat none seen before (all of them without dedupe); `seen` gains their keys."""
    report.records += len(records)
    if seen is None:
        return records
    kept = []
    for record in records:
        key = _dedupe_key(record)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        kept.append(record)
    return kept


def tokenize_records(
    name: str,
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    options: DatasetConfig | None = None,
    report: FilterReport | None = None,
    chat_format: str = DEFAULT_CHAT_FORMAT,
    label_masking: bool = True,
) -> TokenizedSplit:
    """Format records into whole samples in `chat_format` (plain text into pieces of `max_length` tokens);
    the dataset's length filters apply to the whole sample. A conversation is cut to `max_length` only when a
    batch is built (model_training/data/windows.py); here it counts as truncated when it is longer. A sample
    without a supervised token cannot train and is dropped."""
    report = report or FilterReport(name)
    min_length = options.min_length if options else 0
    longest = options.max_length if options else None
    samples, truncated, dropped = [], 0, 0
    for record in records:
        if isinstance(record, TextDocument):
            pieces = format_text(record.text, tokenizer, max_length)
        else:
            pieces = [format_conversation(record.messages, tokenizer, None, record.system, chat_format)]
        for sample in pieces:
            if len(sample.input_ids) < min_length:
                report.too_short += 1
                continue
            if longest is not None and len(sample.input_ids) > longest:
                report.too_long += 1
                continue
            if not label_masking:
                sample = supervise_every_token(sample)
            if sample.num_supervised == 0:
                dropped += 1
                continue
            truncated += len(sample.input_ids) > max_length
            samples.append(sample)
    _warn_dropped(name, dropped)
    return TokenizedSplit(
        name=name,
        samples=samples,
        threads=len(records),
        turns=sum(len(r.messages) if isinstance(r, Conversation) else 1 for r in records),
        truncated=truncated,
        dropped=dropped,
    )


@dataclass(frozen=True)
class _Prepared:
    """One dataset's result: both splits, its filter counts, and the dedupe keys it added for later datasets."""

    train: TokenizedSplit
    val: TokenizedSplit
    report: FilterReport
    dedupe_keys: list[bytes]


def prepare_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    specs = cfg.dataset_specs
    if not specs:
        raise ConfigError("no datasets configured: add a data section (e.g. --configs ... oasst-sample)")
    cache = TokenizedCache.for_config(cfg, tokenizer)
    seen: set[bytes] | None = set() if cfg.dedupe else None
    described: list[dict[str, Any]] | None = []
    data = PreparedData(train=[], val=[])
    for index, (name, options) in enumerate(specs):
        key = f"datasets[{index}].{name}"
        display = name if sum(n == name for n, _ in specs) == 1 else f"{name}[{index}]"
        source = data_path(cfg, name, options.input_file_path, f"{key}.input_file_path")
        prepared, cache_key = None, None
        if cache is not None and described is not None:
            entry = describe_dataset(name, options, source)
            if entry["source"] is None:
                # Unidentifiable input (a hub id before its first download): not cached, and with dedupe
                # neither is any dataset after it, whose samples depend on it.
                logger.info("%s: not cached (its input has nothing to key it by)", display)
                described = None if cfg.dedupe else described
            else:
                described.append(entry)
                # Dedupe crosses sources: with it, what a dataset keeps depends on every dataset before it.
                cache_key = cache.key(described if cfg.dedupe else [entry])
                prepared = cache.load(cache_key, partial(_decode, display))
        hit = prepared is not None
        if hit:
            logger.info("%s: tokenized cache hit (%s)", display, cache.path(cache_key))
            for split in (prepared.train, prepared.val):
                _warn_dropped(display, split.dropped)
            if seen is not None:
                seen.update(prepared.dedupe_keys)
        else:
            start = time.perf_counter()
            prepared = _prepare_dataset(cfg, tokenizer, name, options, source, key, display, seen)
            if cache_key is not None:
                cache.store(cache_key, _encode(prepared))
                logger.info("%s: tokenized cache miss; prepared in %.1f s, stored as %s", display,
                            time.perf_counter() - start, cache.path(cache_key))
        if not prepared.train.samples:
            raise ConfigError(
                f"dataset {key} has no training samples after its filters ({_describe(options)}); "
                "check the language list, top_k, the length limits and the file"
            )
        data.train.append(prepared.train)
        data.val.append(prepared.val)
        data.options.append(options)
        data.reports.append(prepared.report)
        data.cached.append(hit)
    return data


def _prepare_dataset(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    options: DatasetConfig,
    source: str,
    key: str,
    display: str,
    seen: set[bytes] | None,
) -> _Prepared:
    """Load, split, filter and tokenize one dataset; adds the dedupe keys of what it keeps to `seen`."""
    report = FilterReport(display)
    load = SOURCES[name].load
    if load is None:
        raise ConfigError(f"dataset {key} holds ranked replies, not conversations to fine-tune on; name it in a "
                          "trainer_rm.py or trainer_dpo.py run, or use a conversation source such as chat_jsonl")
    try:
        train, val = load(source, options, LoadContext(report, f"{key}.input_file_path"))
    except (FileNotFoundError, ConnectionError) as err:
        # The load's message names the path (or hub id) and the config key; a user fixes it in the config.
        raise ConfigError(str(err)) from None
    train, val = _dedupe(train, seen, report), _dedupe(val, seen, report)
    return _Prepared(
        train=tokenize_records(display, train, tokenizer, cfg.max_length, options, report, cfg.chat_format,
                               cfg.label_masking),
        val=tokenize_records(display, val, tokenizer, cfg.val_max_length or cfg.max_length, options, report,
                             cfg.chat_format, cfg.label_masking),
        report=report,
        dedupe_keys=[_dedupe_key(r) for r in train + val] if seen is not None else [],
    )


_SPLIT_COUNTS = ("threads", "turns", "truncated", "dropped")
_REPORT_COUNTS = ("records", "other_language", "duplicates", "too_short", "too_long")


def _encode(prepared: _Prepared) -> dict[str, np.ndarray]:
    """A dataset's result as the plain integer arrays of a cache file (model_training/data/cache.py)."""
    arrays = {
        "report": np.array([getattr(prepared.report, c) for c in _REPORT_COUNTS], dtype=np.int64),
        "dedupe_keys": np.frombuffer(b"".join(prepared.dedupe_keys), dtype=np.uint8).reshape(-1, 16),
    }
    for side, split in (("train", prepared.train), ("val", prepared.val)):
        arrays.update(samples_to_arrays(side, split.samples))
        arrays[f"{side}_counts"] = np.array([getattr(split, c) for c in _SPLIT_COUNTS], dtype=np.int64)
    return arrays


def _decode(display: str, arrays: dict[str, np.ndarray]) -> _Prepared:
    """The inverse of `_encode`, named `display` as this config names the dataset."""
    splits = {
        side: TokenizedSplit(
            name=display,
            samples=arrays_to_samples(side, arrays),
            **dict(zip(_SPLIT_COUNTS, arrays[f"{side}_counts"].tolist(), strict=True)),
        )
        for side in ("train", "val")
    }
    report = FilterReport(display, **dict(zip(_REPORT_COUNTS, arrays["report"].tolist(), strict=True)))
    return _Prepared(
        train=splits["train"],
        val=splits["val"],
        report=report,
        dedupe_keys=[row.tobytes() for row in arrays["dedupe_keys"].reshape(-1, 16)],
    )


def _warn_dropped(name: str, dropped: int) -> None:
    if dropped:
        logger.warning("%s: dropped %d samples without a supervised token", name, dropped)


def _describe(options: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in vars(options).items())
