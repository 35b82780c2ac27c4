"""The preference stages' data (trainer_rm.py, trainer_dpo.py): ranked replies as groups of formatted sequences.

For each entry of `datasets` + `datasets_extra`, in config order:
  1. find its input as the SFT registry does (`data_path`) and load its comparisons through the source's `compare`
     (OASST: every prefix with at least two ranked replies, OpenAssistant's mode="rm", split by tree; hh-rlhf and
     preference files: chosen and rejected, split by record);
  2. format each reply as the whole conversation it ends, in `chat_format`, with labels on that reply alone (its
     text and closing eos): the reward model scores that sequence, DPO sums its log-probabilities over the labels;
  3. cut a sequence longer than `max_length` to its last `max_length` tokens (OpenAssistant's reward collator
     drops the start of the prefix too): the end of the reply, which both stages read, is kept.
DPO trains on pairs: an OASST group of K ranked replies becomes the K - 1 pairs of its best reply against each other
one (`best_versus_each`). Preference data is not deduplicated.

Each dataset is prepared once into a token store (data/store.py, data/build.py, shared by the ranks as the SFT
datasets are): every reply's sequence whole, and per side the sequences of each group. A group is built when a batch
asks for it, each sequence cut then (`StoredGroups`); nothing per token lives on a rank's heap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, overload

import numpy as np
from transformers import PreTrainedTokenizerBase

from model_training.config import ConfigError, TrainConfig
from model_training.data.build import Chosen, RecordTable, StoreJob
from model_training.data.cache import TokenizedCache, describe_dataset
from model_training.data.encode import encode_comparisons, reply_conversations
from model_training.data.formatting import IGNORE_INDEX, FormattedSample, format_conversations
from model_training.data.prepare import WholeLoad, data_path, dataset_store, workers_per_process
from model_training.data.records import Comparison
from model_training.data.sources import SOURCES
from model_training.data.sources.common import DatasetConfig, FilterReport, LoadContext
from model_training.data.store import StoredSamples, TokenStore, token_dtype
from model_training.stages import STAGES

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PreferenceGroup:
    """One comparison as sequences (prefix + reply, formatted), best reply first; `reference` holds DPO's reference
    log-probabilities of the sequences once they are computed (training/preference_loss.py)."""

    sequences: tuple[FormattedSample, ...]
    reference: tuple[float, ...] | None = None

    @property
    def loss_units(self) -> int:
        """Ordered pairs of the group, K(K-1)/2: what a step's loss is divided by (training/batches.py)."""
        k = len(self.sequences)
        return k * (k - 1) // 2

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)

    def update_digest(self, digest: Any) -> None:
        """Feed the sequences to a hashlib `digest`, closed by a separator: the same sequences grouped otherwise are
        other data."""
        for sequence in self.sequences:
            sequence.update_digest(digest)
        digest.update(b"|")


@dataclass(frozen=True)
class PreferenceSplit:
    """One dataset's train or validation groups; `truncated`: groups with a sequence cut to max_length."""

    name: str
    samples: Sequence[PreferenceGroup]
    """A store's groups (`StoredGroups`), built when asked for; a list where a test makes them."""
    truncated: int


class StoredGroups(Sequence[PreferenceGroup]):
    """The groups of one side of a preference store, each built when it is asked for, its sequences cut to their last
    `max_length` tokens (`keep_end`)."""

    def __init__(self, store: TokenStore, members: np.ndarray, offsets: np.ndarray, max_length: int) -> None:
        self.store = store
        self.members = members
        self.offsets = offsets
        self.max_length = max_length
        self.sequences = StoredSamples(store, store.arrays["sequences_starts"], store.arrays["sequences_ends"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, index: int) -> PreferenceGroup: ...

    @overload
    def __getitem__(self, index: slice) -> StoredGroups: ...

    def __getitem__(self, index: int | slice) -> PreferenceGroup | StoredGroups:
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self))
            return StoredGroups(self.store, self.members, self.offsets[start : max(start, stop) + 1], self.max_length)
        if index < 0:
            index += len(self)
        members = self.members[self.offsets[index] : self.offsets[index + 1]]
        return PreferenceGroup(tuple(keep_end(self.sequences[int(m)], self.max_length) for m in members))

    @property
    def lengths(self) -> np.ndarray:
        """Each group's longest sequence as it trains (cut to `max_length`)."""
        lengths = np.minimum(self.sequences.lengths, self.max_length)[self.members]
        return np.array([lengths[a:b].max() for a, b in zip(self.offsets[:-1], self.offsets[1:])], dtype=np.int64)


@dataclass(frozen=True)
class PreparedPreferences:
    train: list[PreferenceSplit]
    val: list[PreferenceSplit]
    options: list[DatasetConfig] = field(default_factory=list)
    cached: list[bool] = field(default_factory=list)
    """Per dataset: read from its token store rather than prepared."""


def prepare_preferences(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedPreferences:
    """Every configured dataset's comparisons, formatted (DPO: as best-versus-each pairs), from its token store,
    prepared first if need be; ConfigError for a dataset without ranked replies or with no training group left."""
    specs = cfg.dataset_specs
    if not specs:
        raise ConfigError("no datasets configured: add a preference data section (e.g. --configs ... oasst-rm)")
    cache = TokenizedCache.for_config(cfg, tokenizer)
    data = PreparedPreferences(train=[], val=[])
    for index, (name, options) in enumerate(specs):
        key = f"datasets[{index}].{name}"
        display = name if sum(n == name for n, _ in specs) == 1 else f"{name}[{index}]"
        compare = SOURCES[name].compare
        if compare is None:
            having = ", ".join(n for n, s in SOURCES.items() if s.compare is not None)
            raise ConfigError(f"dataset {key} has no ranked replies for the {cfg.stage} stage; sources that have "
                              f"them: {having}")
        source = data_path(cfg, name, options.input_file_path, f"{key}.input_file_path")
        entry = {**describe_dataset(name, options, source), "stage": cfg.stage}  # DPO keeps pairs, rm whole groups
        cache_key = cache.key([entry]) if cache is not None and entry["source"] is not None else None
        job = partial(_store_job, cfg, tokenizer, compare, options, source, f"{key}.input_file_path", display)
        store, hit = dataset_store(job, cache, cache_key, display)
        splits = [PreferenceSplit(display, StoredGroups(store, store.arrays[f"{side}_members"],
                                                        store.arrays[f"{side}_groups"], limit),
                                  store.counts[side]["truncated"])
                  for side, limit in (("train", cfg.max_length), ("val", cfg.val_max_length or cfg.max_length))]
        if not splits[0].samples:
            raise ConfigError(f"dataset {key} has no training comparisons after its filters (each needs a prefix and "
                              "at least two ranked replies); check the language list, the length limits and the file")
        data.train.append(splits[0])
        data.val.append(splits[1])
        data.options.append(options)
        data.cached.append(hit)
        logger.info("%s: %d training and %d validation comparisons", display, len(splits[0].samples),
                    len(splits[1].samples))
    return data


def _store_job(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    compare: Callable[..., Any],
    options: DatasetConfig,
    source: str,
    config_key: str,
    display: str,
    folder: Path,
    store_key: str,
) -> StoreJob:
    """How one dataset's comparisons are prepared: read whole by the source's `compare`, a chunk of them formatted at
    a time, the groups chosen from their lengths."""
    whole = WholeLoad(compare, source, options, LoadContext(FilterReport(display), config_key))
    limits = {"train": cfg.max_length, "val": cfg.val_max_length or cfg.max_length}
    return StoreJob(
        folder=folder,
        key=store_key,
        name=display,
        chunks=whole.chunks,
        encode=lambda part: encode_comparisons(part.records, tokenizer, cfg.chat_format),
        choose=lambda table: choose_groups(table, whole.sides(len(table.starts)), options, limits,
                                           STAGES[cfg.stage].pairs),
        token_dtype=token_dtype(len(tokenizer)),
        workers=cfg.data_workers or workers_per_process(),
        wait_timeout=cfg.data_wait_timeout,
    )


def choose_groups(
    table: RecordTable, sides: tuple[range, range], options: DatasetConfig, limits: dict[str, int], pairs: bool
) -> Chosen:
    """Each side's groups as lists of sequence numbers: a comparison whose sequences are not all within the
    dataset's `min_length`/`max_length` is left out; with `pairs` (DPO) a group of K becomes its K - 1 pairs of the
    best against each other; a group with a sequence longer than the side's limit counts as truncated."""
    lengths = table.columns["sequence_tokens"]
    counts = table.columns["sequences"]
    firsts = np.cumsum(counts) - counts
    ends = np.cumsum(lengths)
    arrays = {"sequences_starts": ends - lengths, "sequences_ends": ends}
    totals: dict[str, dict[str, int]] = {}
    for side, records in zip(("train", "val"), sides):
        members: list[int] = []
        offsets, truncated = [0], 0
        for record in records:
            numbers = list(range(firsts[record], firsts[record] + counts[record]))
            sizes = lengths[numbers]
            too_long = options.max_length is not None and sizes.max() > options.max_length
            if sizes.min() < options.min_length or too_long:
                continue
            truncated += int(sizes.max() > limits[side])
            for group in best_versus_each(numbers) if pairs else [numbers]:
                members += group
                offsets.append(len(members))
        arrays[f"{side}_members"] = np.array(members, dtype=np.int64)
        arrays[f"{side}_groups"] = np.array(offsets, dtype=np.int64)
        totals[side] = {"truncated": truncated}
    return Chosen(arrays, totals)


def format_comparison(comparison: Comparison, tokenizer: PreTrainedTokenizerBase, chat_format: str) -> PreferenceGroup:
    """Each reply after the prefix, formatted whole, labels on the reply alone; best first."""
    formatted = format_conversations(reply_conversations(comparison), tokenizer, chat_format, last_reply_only=True)
    return PreferenceGroup(tuple(FormattedSample(tuple(ids), tuple(labels), False) for ids, labels in formatted))


def keep_end(sample: FormattedSample, max_length: int) -> FormattedSample:
    """`sample`'s last `max_length` tokens; the first label of a cut sample is ignored, since the token that
    predicts it is gone."""
    if len(sample.input_ids) <= max_length:
        return sample
    labels = (IGNORE_INDEX, *sample.labels[-max_length + 1 :]) if max_length > 1 else (IGNORE_INDEX,)
    return FormattedSample(sample.input_ids[-max_length:], labels, truncated=True)


def best_versus_each(ranked: list[T]) -> list[list[T]]:
    """The pairs [best, other] of a ranked group (its sequences, or their numbers), in rank order: what DPO trains
    on."""
    best, *others = ranked
    return [[best, other] for other in others]
