"""The tokenized-dataset cache: a hit gives what a miss computes, and anything that shapes the samples is a new key."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from model_training.config import TrainConfig, load_config, parse_override
from model_training.data.cache import (
    TokenizedCache,
    arrays_to_samples,
    describe_dataset,
    samples_to_arrays,
    source_identity,
)
from model_training.data.formatting import FormattedSample
from model_training.data.registry import PreparedData, prepare_data
from model_training.data.sources.oasst1 import Oasst1Config
from model_training.models.builder import load_tokenizer

PAIR = "[{dolly15k: {input_file_path: dolly_sample.jsonl}}, {alpaca: {input_file_path: alpaca_sample.json}}]"
"""Two sources that share conversations, so that dedupe crosses them."""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Copies of bundled samples, so that a test can touch them."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("dolly_sample.jsonl", "alpaca_sample.json", "chat_sample.jsonl"):
        shutil.copy(REPO / "data" / name, folder / name)
    return folder


def config(sections: list[str], *overrides: str) -> TrainConfig:
    return load_config(["defaults", "tiny-falcon", *sections], [parse_override(o) for o in overrides])


def prepared(cfg: TrainConfig, tokenizer=None) -> PreparedData:
    return prepare_data(cfg, tokenizer or load_tokenizer(cfg))


def cached(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.glob("*.npz")}


def cache_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return ["hit" if "cache hit" in r.message else "miss" for r in caplog.records if "tokenized cache" in r.message]


def test_a_hit_gives_exactly_what_a_miss_computed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="model_training.data.registry")
    cfg = config(["falcon-40b-instruct-mix"], f"data_cache_dir={tmp_path / 'cache'}")
    cold = prepared(cfg)
    warm = prepared(cfg)
    assert cache_events(caplog) == ["miss"] * 4 + ["hit"] * 4
    uncached = prepared(config(["falcon-40b-instruct-mix"], "data_cache_dir=null"))
    for other in (warm, uncached):
        assert other.train == cold.train and other.val == cold.val
        assert other.reports == cold.reports  # --show_dataset_stats reads these counts
    assert cold.reports[1].duplicates > 0  # the bundled export repeats conversations: dedupe counts survive


def test_a_cached_earlier_dataset_still_dedupes_a_recomputed_later_one(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="model_training.data.registry")
    cfg = config([], f"datasets={PAIR}", f"data_dir={data_dir}", f"data_cache_dir={tmp_path / 'cache'}")
    prepared(cfg)
    os.utime(data_dir / "alpaca_sample.json")  # alpaca recomputes; dolly's dedupe keys come from its cache file
    caplog.clear()
    mixed = prepared(cfg)
    assert cache_events(caplog) == ["hit", "miss"]
    uncached = prepared(config([], f"datasets={PAIR}", f"data_dir={data_dir}", "data_cache_dir=null"))
    assert mixed.reports[1].duplicates > 0
    assert mixed.train == uncached.train and mixed.val == uncached.val and mixed.reports == uncached.reports


@pytest.mark.parametrize("override", ["max_length=64", "chat_format=human_bot", "dedupe=false", "rng_seed=1"])
def test_settings_that_shape_samples_change_the_key_and_others_do_not(
    tmp_path: Path, data_dir: Path, override: str
) -> None:
    base = [f"datasets={PAIR}", f"data_dir={data_dir}", f"data_cache_dir={tmp_path / 'cache'}"]
    prepared(config([], *base))
    before = cached(tmp_path / "cache")
    prepared(config([], *base, override))
    grown = cached(tmp_path / "cache") - before
    # rng_seed orders the epochs (the sampler), never the samples: the same files serve it.
    assert len(grown) == (0 if override == "rng_seed=1" else 2)


def test_sampling_options_share_the_entry_but_split_options_do_not(tmp_path: Path, data_dir: Path) -> None:
    def run(options: str) -> set[str]:
        datasets = f"[{{dolly15k: {{input_file_path: dolly_sample.jsonl{options}}}}}]"
        prepared(config([], f"datasets={datasets}", f"data_dir={data_dir}", f"data_cache_dir={tmp_path / 'c'}"))
        return cached(tmp_path / "c")

    first = run("")
    assert run(", fraction: 0.5, replace: true") == first
    assert len(run(", val_split: 0.3") - first) == 1


def test_a_new_tokenizer_token_changes_the_key(tmp_path: Path, data_dir: Path) -> None:
    cfg = config([], f"datasets={PAIR}", f"data_dir={data_dir}", f"data_cache_dir={tmp_path / 'cache'}")
    prepared(cfg)
    before = cached(tmp_path / "cache")
    tokenizer = load_tokenizer(cfg)
    tokenizer.add_tokens(["zebra"])
    prepared(cfg, tokenizer)
    assert len(cached(tmp_path / "cache") - before) == 2


@pytest.mark.parametrize("dedupe", [True, False])
def test_touching_a_file_changes_its_key_and_with_dedupe_those_after_it(
    tmp_path: Path, data_dir: Path, dedupe: bool
) -> None:
    cfg = config([], f"datasets={PAIR}", f"data_dir={data_dir}", f"data_cache_dir={tmp_path / 'cache'}",
                 f"dedupe={str(dedupe).lower()}")
    prepared(cfg)
    before = cached(tmp_path / "cache")
    stat = (data_dir / "dolly_sample.jsonl").stat()
    os.utime(data_dir / "dolly_sample.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    prepared(cfg)
    # Dedupe crosses sources: alpaca's samples depend on dolly's file too, so its key covers it.
    assert len(cached(tmp_path / "cache") - before) == (2 if dedupe else 1)


def test_a_corrupt_file_is_recomputed_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(["falcon-40b-instruct-mix"], f"data_cache_dir={tmp_path / 'cache'}")
    cold = prepared(cfg)
    files = sorted((tmp_path / "cache").glob("*.npz"))
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])  # a half-written file
    files[1].write_bytes(b"not an archive")
    np.savez(files[2], key=np.array("another key"))  # a whole archive, but not this entry's
    caplog.set_level(logging.INFO, logger="model_training.data")
    again = prepared(cfg)
    assert sum("is unreadable" in r.message for r in caplog.records) == 3
    assert again.train == cold.train and again.val == cold.val and again.reports == cold.reports
    caplog.clear()
    prepared(cfg)
    assert cache_events(caplog) == ["hit"] * 4  # the bad files were rewritten


def test_an_unwritable_cache_folder_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    cfg = config(["oasst-sample"], f"data_cache_dir={blocker / 'cache'}")
    data = prepared(cfg)
    assert data.train[0].samples
    assert any("could not write the tokenized cache" in r.message for r in caplog.records)


def test_caching_off(tmp_path: Path) -> None:
    cfg = config(["oasst-sample"], "data_cache_dir=null")
    assert TokenizedCache.for_config(cfg, load_tokenizer(cfg)) is None
    assert prepared(cfg).train[0].samples


def test_samples_round_trip_through_arrays_and_bad_offsets_are_refused() -> None:
    samples = [FormattedSample((5, 6, 7), (-100, 6, 7), False), FormattedSample((), (), False),
               FormattedSample((9,), (9,), True)]
    arrays = samples_to_arrays("train", samples)
    assert arrays_to_samples("train", arrays) == samples
    arrays["train_offsets"] = np.array([0, 3, 1, 4])
    with pytest.raises(ValueError, match="do not fit together"):
        arrays_to_samples("train", arrays)


def test_a_hub_id_not_downloaded_yet_is_not_cached() -> None:
    assert source_identity("someone/never-downloaded-dataset") is None
    assert describe_dataset("oasst1", Oasst1Config(), "someone/never-downloaded-dataset")["source"] is None
