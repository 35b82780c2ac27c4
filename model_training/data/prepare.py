"""The datasets a config names: loaded, split, deduplicated, filtered and tokenized into samples in token stores.

For each entry of `datasets` + `datasets_extra` (`TrainConfig.dataset_specs`), in config order:
  1. find its input (`data_path`: a relative path in `cache_dir`, then in `data_dir`), and read its records through
     its source (model_training/data/sources/): a large JSON Lines or text file as a stream of chunks
     (sources/stream.py), anything else through the source's `load`, which also splits it for validation;
  2. tokenize the records, chunk by chunk, shared between every process that prepares the dataset
     (model_training/data/build.py: the ranks of a job, a prepare command), into the dataset's token store
     (store.py), kept in `data_cache_dir` under a key of everything the samples depend on (cache.py);
  3. choose the samples from the records (`choose_samples`): the split by record of a streamed source (each source
     splits by its own rule, OASST by message tree as the OpenAssistant trainer splits, in its `load`), exact
     duplicates of conversations seen earlier in this or an earlier dataset dropped (`dedupe`), a text cut into
     pieces of `max_length` tokens, samples outside the dataset's `min_length`/`max_length` dropped.
A conversation longer than `max_length` is cut only when a batch is built (model_training/data/windows.py). Every
process then reads the store memory-mapped. How much of each dataset an epoch draws is the sampler's business
(model_training/training/step_plan.py). No source is named here: `SOURCES` is the one table of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from model_training.config import ConfigError, TrainConfig, resolve_input_path
from model_training.data.build import Chosen, Chunk, RecordTable, StoreJob, build_store
from model_training.data.cache import TokenizedCache, describe_dataset
from model_training.data.encode import DEDUPE_KEY_BYTES, encode_records
from model_training.data.formatting import FormattedSample
from model_training.data.sources import SOURCES
from model_training.data.sources.common import DatasetConfig, FilterReport, LoadContext, Source, split_by_record
from model_training.data.sources.rows import is_hub_dataset
from model_training.data.sources.stream import ChunkRecords, chunk_records, line_chunks, streams
from model_training.data.store import TokenStore, token_dtype

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedSplit:
    """One dataset's train or validation side, formatted; `dropped` lost every supervised token to truncation."""

    name: str
    samples: Sequence[FormattedSample]
    """A store's samples (store.py), read when asked for; a list where a test makes them."""
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


RECORDS_PER_CHUNK = 2048
"""Records of a source read whole (through its `load`) per chunk of the preparation."""
_SPLIT_COUNTS = ("threads", "turns", "truncated", "dropped")
_REPORT_COUNTS = ("records", "other_language", "duplicates", "too_short", "too_long")


def prepare_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Every configured dataset's samples (module docstring), from its token store, prepared first if need be."""
    specs = cfg.dataset_specs
    if not specs:
        raise ConfigError("no datasets configured: add a data section (e.g. --configs ... oasst-sample)")
    cache = TokenizedCache.for_config(cfg, tokenizer)
    described: list[dict[str, Any]] | None = []
    earlier: list[TokenStore] = []
    data = PreparedData(train=[], val=[])
    for index, (name, options) in enumerate(specs):
        key = f"datasets[{index}].{name}"
        display = name if sum(n == name for n, _ in specs) == 1 else f"{name}[{index}]"
        source = data_path(cfg, name, options.input_file_path, f"{key}.input_file_path")
        if SOURCES[name].load is None:
            raise ConfigError(f"dataset {key} holds ranked replies, not conversations to fine-tune on; name it in a "
                              "trainer_rm.py or trainer_dpo.py run, or use a conversation source such as chat_jsonl")
        cache_key = None
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
        start = time.perf_counter()
        job = partial(_store_job, cfg, tokenizer, name, options, source, key, display, earlier)
        store, hit = dataset_store(job, cache, cache_key, display)
        counts = store.counts
        splits = [TokenizedSplit(display, store.samples(side), **counts[side]) for side in ("train", "val")]
        for split in splits:
            _warn_dropped(display, split.dropped)
        if hit:
            logger.info("%s: tokenized cache hit (%s)", display, store.folder)
        elif cache_key is not None:
            logger.info("%s: tokenized cache miss; prepared in %.1f s, stored as %s", display,
                        time.perf_counter() - start, store.folder)
        if not splits[0].samples:
            raise ConfigError(
                f"dataset {key} has no training samples after its filters ({_describe(options)}); "
                "check the language list, top_k, the length limits and the file"
            )
        data.train.append(splits[0])
        data.val.append(splits[1])
        data.options.append(options)
        data.reports.append(FilterReport(display, **counts["report"]))
        data.cached.append(hit)
        earlier.append(store)
    return data


def dataset_store(
    job: Callable[[Path, str], StoreJob], cache: TokenizedCache | None, cache_key: str | None, display: str
) -> tuple[TokenStore, bool]:
    """The dataset's store, from the cache folder (shared with every process that prepares it) when it has a key,
    else prepared in a folder of this process's own, which is gone once the arrays are mapped."""
    if cache is not None and cache_key is not None:
        try:
            return build_store(job(cache.path(cache_key), cache_key))
        except OSError as err:  # a read-only or full cache folder
            logger.warning("%s: could not use the tokenized cache folder %s (%s); preparing it in a private folder",
                           display, cache.folder, err)
    private = Path(tempfile.mkdtemp(prefix="model_training-data-"))
    try:
        store, _ = build_store(job(private / "store", "private"))
    finally:
        shutil.rmtree(private)  # the mapped arrays outlive their names
    return store, False


def workers_per_process() -> int:
    """Tokenizing processes one process forks (data/build.py): the cores it may use, shared with the other processes
    of its node when the launcher gave every process all of them (deepspeed: LOCAL_SIZE; torchrun: LOCAL_WORLD_SIZE;
    srun without binding: SLURM_NTASKS_PER_NODE)."""
    cores = len(os.sched_getaffinity(0))
    local = int(next((os.environ[k] for k in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
                      if os.environ.get(k, "").isdigit()), 1))
    return max(1, cores // local if cores == os.cpu_count() else cores)


def _store_job(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    options: DatasetConfig,
    source: str,
    key: str,
    display: str,
    earlier: list[TokenStore],
    folder: Path,
    store_key: str,
) -> StoreJob:
    """How one dataset is prepared: its chunks (streamed, or from its whole `load`), their encoding, the choice."""
    src = SOURCES[name]
    context = LoadContext(FilterReport(display), f"{key}.input_file_path")
    whole = WholeLoad(src.load, source, options, context)
    if streams(src, source):
        chunks: Callable[[], Iterator[Chunk]] = partial(_stream_chunks, src, Path(source), options, whole.error)
        sides: Callable[[int], tuple[Sequence[int], Sequence[int]]] = partial(_split, options=options)
    else:
        chunks, sides = whole.chunks, whole.sides
    seen = (lambda: {row.tobytes() for store in earlier for row in store.arrays["dedupe_keys"]}) if cfg.dedupe else None
    rules = SampleRules(
        max_length={"train": cfg.max_length, "val": cfg.val_max_length or cfg.max_length},
        min_length=options.min_length,
        longest=options.max_length,
    )
    return StoreJob(
        folder=folder,
        key=store_key,
        name=display,
        chunks=chunks,
        encode=lambda part: encode_records(part.records, part.other_language, tokenizer, cfg.chat_format,
                                           cfg.label_masking, cfg.dedupe),
        choose=lambda table: choose_samples(table, sides(len(table.starts)), rules, context.report, seen, source),
        token_dtype=token_dtype(len(tokenizer)),
        workers=cfg.data_workers or workers_per_process(),
        wait_timeout=cfg.data_wait_timeout,
    )


def _stream_chunks(
    src: Source, path: Path, options: DatasetConfig, whole_file_error: Callable[[], Any]
) -> Iterator[Chunk]:
    for lines in line_chunks(path, src.documents):
        yield Chunk(lines.number, lines.fraction, partial(chunk_records, lines, src, path, options, whole_file_error))


def _split(count: int, options: DatasetConfig) -> tuple[list[int], list[int]]:
    """The records of a streamed source on each side, by the source's own rule (`split_by_record`)."""
    return split_by_record(range(count), options)


@dataclass
class WholeLoad:
    """A source's records read whole through its `load` (or `compare`: `read`), once, on first use, as chunks of
    `RECORDS_PER_CHUNK`."""

    read: Callable[[str, Any, LoadContext], tuple[list[Any], list[Any]]]
    source: str
    options: DatasetConfig
    context: LoadContext
    _records: list[Any] | None = None
    _train: int = 0

    def load(self) -> list[Any]:
        if self._records is None:
            try:
                train, val = self.read(self.source, self.options, self.context)
            except (FileNotFoundError, ConnectionError) as err:
                # The load's message names the path (or hub id) and the config key; a user fixes it in the config.
                raise ConfigError(str(err)) from None
            self._records, self._train = train + val, len(train)
        return self._records

    def chunks(self) -> Iterator[Chunk]:
        records = self.load()
        count = max(1, -(-len(records) // RECORDS_PER_CHUNK))
        for number in range(count):
            part = records[number * RECORDS_PER_CHUNK : (number + 1) * RECORDS_PER_CHUNK]
            yield Chunk(number, (number + 1) / count, partial(ChunkRecords, part, [False] * len(part), 0))

    def sides(self, count: int) -> tuple[range, range]:
        return range(self._train), range(self._train, count)

    def error(self) -> None:
        """The whole load's error, where it explains a file better than a stream's line can."""
        self.load()


@dataclass(frozen=True)
class SampleRules:
    """How a dataset's records become samples: each side's length limit, the dataset's own length filters."""

    max_length: dict[str, int]
    """The global `max_length` (train) and `val_max_length` (val): what a text is cut into pieces of, and past which a
    conversation counts as truncated."""
    min_length: int
    longest: int | None


def choose_samples(
    table: RecordTable,
    sides: tuple[Sequence[int], Sequence[int]],
    rules: SampleRules,
    loaded: FilterReport,
    seen: Callable[[], set[bytes]] | None,
    source: str,
) -> Chosen:
    """The samples of each side (`sides`: the records of train, then of validation), as token ranges, in the order of
    the records. Dedupe runs over the training records, then the validation ones (`seen`: the digests of every
    earlier dataset's records; None without dedupe). `loaded`: what the source's own load counted."""
    if table.skipped:
        logger.warning("skipped %d invalid record(s) in %s", table.skipped, source)
    report = {name: getattr(loaded, name) for name in _REPORT_COUNTS}
    known = seen() if seen is not None else None
    kept_keys: list[np.ndarray] = []
    arrays, counts = {}, {}
    for side, indices in zip(("train", "val"), sides):
        chosen, counts[side] = _choose_side(table, indices, rules, rules.max_length[side], report, known, kept_keys)
        ranges = np.array(chosen, dtype=np.int64).reshape(-1, 2)
        arrays[f"{side}_starts"], arrays[f"{side}_ends"] = ranges[:, 0].copy(), ranges[:, 1].copy()
    arrays["dedupe_keys"] = np.array(kept_keys, dtype=np.uint8).reshape(-1, DEDUPE_KEY_BYTES)
    return Chosen(arrays, counts={**counts, "report": report})


def _choose_side(
    table: RecordTable,
    indices: Sequence[int],
    rules: SampleRules,
    limit: int,
    report: dict[str, int],
    known: set[bytes] | None,
    kept_keys: list[np.ndarray],
) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """One side's (start, end) ranges and counts; `report`, `known` and `kept_keys` gain what it saw. A record the
    source's filter refused, or one repeating a record in `known`, is counted and dropped; a text is cut into pieces
    of `limit` tokens; a sample outside the length filters, or without a supervised token, is counted and dropped."""
    split = dict.fromkeys(_SPLIT_COUNTS, 0)
    refused, keys, turns, tokens, text, supervised = (
        table.columns[name] for name in ("refused", "keys", "turns", "tokens", "text", "supervised"))
    chosen: list[tuple[int, int]] = []
    for i in indices:
        report["records"] += 1
        if refused[i]:
            report["other_language"] += 1
            continue
        if known is not None:
            key = keys[i].tobytes()
            if key in known:
                report["duplicates"] += 1
                continue
            known.add(key)
            kept_keys.append(keys[i])
        split["threads"] += 1
        split["turns"] += int(turns[i])
        start, count = int(table.starts[i]), int(tokens[i])
        if text[i]:  # every token of a text carries loss; a piece of one token has no prediction to learn
            pieces = [(start + at, min(limit, count - at)) for at in range(0, count, limit) if count - at > 1]
            pieces_with_loss = [(begin, length, length) for begin, length in pieces]
        else:
            pieces_with_loss = [(start, count, int(supervised[i]))]
        for begin, length, with_loss in pieces_with_loss:
            if length < rules.min_length:
                report["too_short"] += 1
            elif rules.longest is not None and length > rules.longest:
                report["too_long"] += 1
            elif with_loss == 0:
                split["dropped"] += 1
            else:
                split["truncated"] += length > limit
                chosen.append((begin, begin + length))
    return chosen, split


def _warn_dropped(name: str, dropped: int) -> None:
    if dropped:
        logger.warning("%s: dropped %d samples without a supervised token", name, dropped)


def _describe(options: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in vars(options).items())
