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
one (`best_versus_each`). Preference data is not deduplicated and not kept in the tokenized cache: it is small, and
formatting it takes seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from model_training.config import ConfigError, TrainConfig
from model_training.data.formatting import IGNORE_INDEX, FormattedSample, format_conversation
from model_training.data.records import Comparison, Message
from model_training.data.registry import data_path
from model_training.data.sources import SOURCES
from model_training.data.sources.common import DatasetConfig, FilterReport, LoadContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferenceGroup:
    """One comparison as sequences (prefix + reply, formatted), best reply first; `reference` holds DPO's reference
    log-probabilities of the sequences once they are computed (training/preference.py)."""

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


@dataclass(frozen=True)
class PreferenceSplit:
    """One dataset's train or validation groups; `truncated`: groups with a sequence cut to max_length."""

    name: str
    samples: list[PreferenceGroup]
    truncated: int


@dataclass(frozen=True)
class PreparedPreferences:
    train: list[PreferenceSplit]
    val: list[PreferenceSplit]
    options: list[DatasetConfig] = field(default_factory=list)


def prepare_preferences(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedPreferences:
    """Every configured dataset's comparisons, formatted (DPO: as best-versus-each pairs); ConfigError for a dataset
    without ranked replies or with no training group left."""
    specs = cfg.dataset_specs
    if not specs:
        raise ConfigError("no datasets configured: add a preference data section (e.g. --configs ... oasst-rm)")
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
        try:
            train, val = compare(source, options, LoadContext(FilterReport(display), f"{key}.input_file_path"))
        except (FileNotFoundError, ConnectionError) as err:
            raise ConfigError(str(err)) from None
        splits = [_format_split(display, comparisons, tokenizer, length, options, cfg)
                  for comparisons, length in ((train, cfg.max_length), (val, cfg.val_max_length or cfg.max_length))]
        if not splits[0].samples:
            raise ConfigError(f"dataset {key} has no training comparisons after its filters (each needs a prefix and "
                              "at least two ranked replies); check the language list, the length limits and the file")
        data.train.append(splits[0])
        data.val.append(splits[1])
        data.options.append(options)
        logger.info("%s: %d training and %d validation comparisons", display, len(splits[0].samples),
                    len(splits[1].samples))
    return data


def _format_split(
    name: str,
    comparisons: list[Comparison],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    options: DatasetConfig,
    cfg: TrainConfig,
) -> PreferenceSplit:
    groups, truncated = [], 0
    for comparison in comparisons:
        group = format_comparison(comparison, tokenizer, cfg.chat_format)
        lengths = [len(s.input_ids) for s in group.sequences]
        if min(lengths) < options.min_length or (options.max_length is not None and max(lengths) > options.max_length):
            continue
        truncated += max(lengths) > max_length
        cut = PreferenceGroup(tuple(keep_end(s, max_length) for s in group.sequences))
        groups += best_versus_each(cut) if cfg.stage == "dpo" else [cut]
    return PreferenceSplit(name, groups, truncated)


def format_comparison(comparison: Comparison, tokenizer: PreTrainedTokenizerBase, chat_format: str) -> PreferenceGroup:
    """Each reply after the prefix, formatted whole, labels on the reply alone; best first."""
    sequences = []
    for number, reply in enumerate(comparison.replies):
        message = Message(role="assistant", text=reply, message_id=f"reply:{number}")
        sample = format_conversation([*comparison.prefix, message], tokenizer, None, comparison.system, chat_format,
                                     last_reply_only=True)
        sequences.append(sample)
    return PreferenceGroup(tuple(sequences))


def keep_end(sample: FormattedSample, max_length: int) -> FormattedSample:
    """`sample`'s last `max_length` tokens; the first label of a cut sample is ignored, since the token that
    predicts it is gone."""
    if len(sample.input_ids) <= max_length:
        return sample
    labels = (IGNORE_INDEX, *sample.labels[-max_length + 1 :]) if max_length > 1 else (IGNORE_INDEX,)
    return FormattedSample(sample.input_ids[-max_length:], labels, truncated=True)


def best_versus_each(group: PreferenceGroup) -> list[PreferenceGroup]:
    """The pairs (best, other) of a ranked group, in rank order: what DPO trains on."""
    best, *others = group.sequences
    return [PreferenceGroup((best, other)) for other in others]
