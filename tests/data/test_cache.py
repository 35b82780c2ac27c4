"""The token stores' cache: a hit gives what a miss computes, and anything that shapes the samples is a new key."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from model_training.config import TrainConfig, load_config, parse_override
from model_training.data.cache import TokenizedCache, describe_dataset, source_identity
from model_training.data.prepare import PreparedData, prepare_data
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
    """The stores in the cache folder (each a folder named by its key)."""
    return {p.name for p in cache_dir.iterdir() if (p / "meta.json").exists()}


def as_lists(data: PreparedData) -> tuple:
    """Every split's name, counts and samples, the samples as a list (a store's are read from its arrays)."""
    return tuple((s.name, list(s.samples), s.threads, s.turns, s.truncated, s.dropped) for s in data.train + data.val)


def cache_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return ["hit" if "cache hit" in r.message else "miss" for r in caplog.records if "tokenized cache" in r.message]


def test_a_hit_gives_exactly_what_a_miss_computed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="model_training.data.prepare")
    cfg = config(["falcon-40b-instruct-mix"], f"data_cache_dir={tmp_path / 'cache'}")
    cold = prepared(cfg)
    warm = prepared(cfg)
    assert cache_events(caplog) == ["miss"] * 4 + ["hit"] * 4
    uncached = prepared(config(["falcon-40b-instruct-mix"], "data_cache_dir=null"))
    for other in (warm, uncached):
        assert as_lists(other) == as_lists(cold)
        assert other.reports == cold.reports  # --show_dataset_stats reads these counts
    assert cold.reports[1].duplicates > 0  # the bundled export repeats conversations: dedupe counts survive


def test_a_cached_earlier_dataset_still_dedupes_a_recomputed_later_one(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="model_training.data.prepare")
    cfg = config([], f"datasets={PAIR}", f"data_dir={data_dir}", f"data_cache_dir={tmp_path / 'cache'}")
    prepared(cfg)
    os.utime(data_dir / "alpaca_sample.json")  # alpaca recomputes; dolly's dedupe keys come from its cache file
    caplog.clear()
    mixed = prepared(cfg)
    assert cache_events(caplog) == ["hit", "miss"]
    uncached = prepared(config([], f"datasets={PAIR}", f"data_dir={data_dir}", "data_cache_dir=null"))
    assert mixed.reports[1].duplicates > 0
    assert as_lists(mixed) == as_lists(uncached) and mixed.reports == uncached.reports


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


def test_a_damaged_store_is_prepared_again_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(["falcon-40b-instruct-mix"], f"data_cache_dir={tmp_path / 'cache'}")
    cold = as_lists(prepared(cfg))
    stores = sorted(tmp_path / "cache" / name for name in cached(tmp_path / "cache"))
    ids = stores[0] / "ids.npy"
    ids.write_bytes(ids.read_bytes()[: ids.stat().st_size // 2])  # cut short (an interrupted copy)
    mask = stores[1] / "mask.npy"
    altered = bytearray(mask.read_bytes())
    altered[-1] ^= 1  # the same size, one label flipped
    mask.write_bytes(bytes(altered))
    (stores[2] / "meta.json").unlink()
    np.save(stores[3] / "train_starts.npy", np.zeros(3, np.int64))  # another array, whatever its size
    caplog.set_level(logging.INFO, logger="model_training.data")
    again = prepared(cfg)
    damaged = " ".join(r.message for r in caplog.records if "is damaged" in r.message)
    for reason in ("ids.npy has", "mask.npy does not match", "meta.json is missing", "train_starts.npy has"):
        assert damaged.count(reason) == 1, damaged
    assert as_lists(again) == cold
    caplog.clear()
    prepared(cfg)
    assert cache_events(caplog) == ["hit"] * 4  # the damaged stores were written again


def test_an_unwritable_cache_folder_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    cfg = config(["oasst-sample"], f"data_cache_dir={blocker / 'cache'}")
    data = prepared(cfg)
    assert data.train[0].samples
    assert any("could not use the tokenized cache folder" in r.message for r in caplog.records)


def test_caching_off(tmp_path: Path) -> None:
    cfg = config(["oasst-sample"], "data_cache_dir=null")
    assert TokenizedCache.for_config(cfg, load_tokenizer(cfg)) is None
    assert prepared(cfg).train[0].samples


def test_a_hub_id_not_downloaded_yet_is_not_cached() -> None:
    assert source_identity("someone/never-downloaded-dataset") is None
    assert describe_dataset("oasst1", Oasst1Config(), "someone/never-downloaded-dataset")["source"] is None
