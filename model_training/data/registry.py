"""The datasets a config names: loaded, split, deduplicated, filtered and tokenized into formatted samples.

For each entry of `datasets` + `datasets_extra`, in config order:
  1. load its records (model_training/data/oasst.py for `oasst_export`, model_training/data/sources.py for
     the others) and split them into train and validation (by message tree for OASST, by record otherwise;
     a pure function of `manual_seed`);
  2. drop exact duplicates of conversations seen earlier, in this or an earlier dataset (`dedupe`), and
     records in other languages (`lang`, where the source gives one);
  3. format each conversation (model_training/data/formatting.py) or cut each text into pieces, drop samples
     outside the dataset's `min_length`/`max_length`, then cut the rest to the global `max_length`.
How much of each dataset an epoch draws is the sampler's business (model_training/training/sampler.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from model_training.config import ConfigError, DatasetConfig, TrainConfig, dataset_specs, resolve_input_path
from model_training.data.chat_formats import DEFAULT_CHAT_FORMAT
from model_training.data.formatting import FormattedSample, format_conversation, format_text, truncate
from model_training.data.oasst import load_oasst_export
from model_training.data.selection import held_out_groups, parse_languages
from model_training.data.sources import LOADERS as SOURCE_LOADERS
from model_training.data.sources import Conversation, TextDocument

logger = logging.getLogger(__name__)

Record = Conversation | TextDocument


@dataclass(frozen=True)
class TokenizedSplit:
    """One dataset's train or validation side, formatted; `dropped` lost every supervised token to truncation."""

    name: str
    samples: list[FormattedSample]
    threads: int
    turns: int
    truncated: int
    dropped: int


@dataclass
class FilterReport:
    """What the filters removed from one dataset (both splits), for `--show_dataset_stats`."""

    name: str
    records: int = 0
    other_language: int = 0
    duplicates: int = 0
    too_short: int = 0
    too_long: int = 0


@dataclass(frozen=True)
class PreparedData:
    train: list[TokenizedSplit]
    val: list[TokenizedSplit]
    options: list[DatasetConfig] = field(default_factory=list)
    reports: list[FilterReport] = field(default_factory=list)


def data_path(cfg: TrainConfig, path: str) -> str:
    """A dataset source: an absolute path stays; a relative one resolves against `data_dir` when it exists
    there, and is otherwise left as it is (a hub id such as OpenAssistant/oasst1)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    local = resolve_input_path(cfg.data_dir) / p
    return str(local) if local.exists() or p.suffix else path


def _load_oasst_export(options: Any, source: str, key: str) -> tuple[list[Record], list[Record]]:
    train, val = load_oasst_export(
        source,
        lang=options.lang,
        top_k=options.top_k,
        val_split=options.val_split,
        manual_seed=options.manual_seed,
        skip_invalid=options.skip_invalid,
        config_key=f"{key}.input_file_path",
    )
    return [Conversation(messages=tuple(t)) for t in train], [Conversation(messages=tuple(t)) for t in val]


def _load_source(name: str) -> Callable[[Any, str, str], tuple[list[Record], list[Record]]]:
    def load(options: Any, source: str, key: str) -> tuple[list[Record], list[Record]]:
        extra = {"lang": options.lang, "top_k": options.top_k} if name == "oasst1" else {}
        records = SOURCE_LOADERS[name](
            source, skip_invalid=options.skip_invalid, config_key=f"{key}.input_file_path", **extra
        )
        return split_records(records, options.val_split, options.manual_seed)

    return load


LOADERS: dict[str, Callable[[Any, str, str], tuple[list[Record], list[Record]]]] = {
    "oasst_export": _load_oasst_export,
    **{name: _load_source(name) for name in SOURCE_LOADERS},
}
"""Dataset name -> loader returning (train, val) records; every name in DATASET_CONFIGS has one."""


def split_records(records: Sequence[Record], val_split: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out `val_split` of the groups (a record's `group`, else the record alone), chosen by `seed`
    (model_training/data/selection.py); records keep their order on each side."""
    keys = [getattr(record, "group", None) or f"record:{index:09d}" for index, record in enumerate(records)]
    held_out = held_out_groups(keys, val_split, seed)
    train = [r for r, k in zip(records, keys) if k not in held_out]
    val = [r for r, k in zip(records, keys) if k in held_out]
    return train, val


def _dedupe_key(record: Record) -> tuple:
    if isinstance(record, TextDocument):
        return ("text", record.text.strip())
    return (record.system, tuple((m.role, m.text.strip()) for m in record.messages))


def _keep(records: list[Record], options: Any, seen: set[tuple] | None, report: FilterReport) -> list[Record]:
    lang = getattr(options, "lang", None)
    langs = parse_languages(lang) if lang else None
    kept = []
    for record in records:
        report.records += 1
        record_lang = getattr(record, "lang", None)
        if langs is not None and record_lang is not None and record_lang not in langs:
            report.other_language += 1
            continue
        if seen is not None:
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
) -> TokenizedSplit:
    """Format records into samples in `chat_format`; length filters first (on the whole sample), then the
    global cut."""
    report = report or FilterReport(name)
    min_length = options.min_length if options else 0
    longest = options.max_length if options else None
    samples, truncated, dropped = [], 0, 0
    for record in records:
        if isinstance(record, TextDocument):
            pieces = format_text(record.text, tokenizer, max_length)
        else:
            pieces = [format_conversation(record.messages, tokenizer, None, record.system, chat_format)]
        for full in pieces:
            if len(full.input_ids) < min_length:
                report.too_short += 1
                continue
            if longest is not None and len(full.input_ids) > longest:
                report.too_long += 1
                continue
            sample = truncate(full, max_length)
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
        threads=len(records),
        turns=sum(len(r.messages) if isinstance(r, Conversation) else 1 for r in records),
        truncated=truncated,
        dropped=dropped,
    )


def prepare_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    specs = dataset_specs(cfg)
    if not specs:
        raise ConfigError("no datasets configured: add a data section (e.g. --configs ... oasst-sample)")
    seen: set[tuple] | None = set() if cfg.dedupe else None
    data = PreparedData(train=[], val=[])
    for index, (name, options) in enumerate(specs):
        key = f"datasets[{index}].{name}"
        display = name if sum(n == name for n, _ in specs) == 1 else f"{name}[{index}]"
        try:
            train, val = LOADERS[name](options, data_path(cfg, options.input_file_path), key)
        except FileNotFoundError as err:
            # The loader's message names the path and the config key; a user fixes it in the config.
            raise ConfigError(str(err)) from None
        report = FilterReport(display)
        train, val = _keep(train, options, seen, report), _keep(val, options, seen, report)
        train_split = tokenize_records(display, train, tokenizer, cfg.max_length, options, report, cfg.chat_format)
        if not train_split.samples:
            raise ConfigError(
                f"dataset {key} has no training samples after its filters ({_describe(options)}); "
                "check the language list, top_k, the length limits and the file"
            )
        data.train.append(train_split)
        data.val.append(tokenize_records(display, val, tokenizer, cfg.max_length, options, report, cfg.chat_format))
        data.options.append(options)
        data.reports.append(report)
    return data


def _describe(options: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in vars(options).items())
