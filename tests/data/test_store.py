"""The token store: every sample token for token what formatting the loaded records gives, read from mapped arrays."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from model_training.config import TrainConfig, load_config, parse_override
from model_training.data.encode import dedupe_key
from model_training.data.formatting import FormattedSample, format_conversation, format_text, supervise_every_token
from model_training.data.prepare import dataset_folders, prepare_data
from model_training.data.records import TextDocument
from model_training.data.sources import SOURCES
from model_training.data.sources.common import FilterReport, LoadContext
from model_training.data.store import Concatenated, StoredSamples, token_dtype, update_digest
from model_training.data.windows import EVALUATION, LengthRule
from model_training.models.builder import load_tokenizer

MIX = ["defaults", "tiny-falcon", "falcon-40b-instruct-mix"]


def config(sections: list[str], *overrides: str) -> TrainConfig:
    return load_config(sections, [parse_override(o) for o in overrides])


def formatted_directly(cfg: TrainConfig, tokenizer) -> list[tuple[list[FormattedSample], list[FormattedSample]]]:
    """Each dataset's (train, validation) samples the plain way: its source's `load`, dedupe across datasets, each
    record formatted alone, the length filters. What the store must hold, sample for sample."""
    seen: set[bytes] = set()
    result = []
    for name, options in cfg.dataset_specs:
        path = next(str(folder / options.input_file_path) for folder in dataset_folders(cfg)
                    if (folder / options.input_file_path).exists())
        splits = SOURCES[name].load(path, options, LoadContext(FilterReport(name)))
        sides = []
        for records, limit in zip(splits, (cfg.max_length, cfg.val_max_length or cfg.max_length)):
            samples = []
            for record in records:
                if cfg.dedupe:
                    if dedupe_key(record) in seen:
                        continue
                    seen.add(dedupe_key(record))
                pieces = (format_text(record.text, tokenizer, limit) if isinstance(record, TextDocument) else
                          [format_conversation(record.messages, tokenizer, None, record.system, cfg.chat_format)])
                for sample in pieces:
                    sample = sample if cfg.label_masking else supervise_every_token(sample)
                    length = len(sample.input_ids)
                    if (length >= options.min_length and (options.max_length is None or length <= options.max_length)
                            and sample.num_supervised):
                        samples.append(sample)
            sides.append(samples)
        result.append(tuple(sides))
    return result


@pytest.mark.parametrize("overrides", [
    (),
    ("max_length=24", "val_max_length=40"),  # text cut into other pieces on each side
    ("chat_format=human_bot", "label_masking=false", "dedupe=false"),
])
def test_every_sample_is_what_formatting_the_loaded_records_gives(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    cfg = config(MIX, f"data_cache_dir={tmp_path}", *overrides)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    expected = formatted_directly(cfg, tokenizer)
    for train, val, (want_train, want_val) in zip(data.train, data.val, expected, strict=True):
        assert isinstance(train.samples, StoredSamples)
        assert list(train.samples) == want_train and list(val.samples) == want_val


def test_ids_are_uint16_where_the_vocabulary_fits(tmp_path: Path) -> None:
    assert token_dtype(65_024 + 3) == np.uint16 and token_dtype(65_537) == np.int32
    cfg = config(["defaults", "tiny-falcon", "oasst-sample"], f"data_cache_dir={tmp_path}")
    store = prepare_data(cfg, load_tokenizer(cfg)).train[0].samples.store
    assert store.ids.dtype == np.uint16 and isinstance(store.ids, np.memmap) and not store.ids.flags.writeable
    assert store.mask.dtype == np.uint8 and set(np.unique(store.mask)) <= {0, 1}


def test_stored_samples_slice_measure_and_hash_like_the_samples_they_hold(tmp_path: Path) -> None:
    cfg = config(MIX, f"data_cache_dir={tmp_path}", "max_length=32")
    data = prepare_data(cfg, load_tokenizer(cfg))
    stored = data.train[1].samples
    plain = list(stored)
    assert list(stored[3:9]) == plain[3:9] and isinstance(stored[3:9], StoredSamples)
    assert stored.lengths.tolist() == [s.num_tokens for s in plain]
    cut = [LengthRule(32).apply(s, EVALUATION, i) for i, s in enumerate(plain)]
    assert stored.supervised_in_first(32).tolist() == [s.num_supervised for s in cut]
    assert any(s.num_tokens > 32 for s in plain)  # the cut matters for some
    by_store, by_sample = hashlib.sha256(), hashlib.sha256()
    update_digest(Concatenated([split.samples for split in data.train]), by_store)
    for split in data.train:
        for sample in split.samples:
            sample.update_digest(by_sample)
    assert by_store.hexdigest() == by_sample.hexdigest()


def test_concatenated_reads_its_parts_as_one_sequence() -> None:
    parts = [[1, 2], [], [3], [4, 5, 6]]
    joined = Concatenated(parts)
    assert len(joined) == 6 and list(joined) == [1, 2, 3, 4, 5, 6]
    assert [joined[i] for i in range(6)] == [1, 2, 3, 4, 5, 6] and joined[-1] == 6
    with pytest.raises(IndexError):
        joined[6]
