"""Datasets by name through the real config: the input's lookup, dedupe, filters and their counts (each source's
load, sample and split: test_sources.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cpu_env

from model_training.config import ConfigError, load_config, parse_override
from model_training.data.prepare import prepare_data
from model_training.models.builder import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_config(["defaults", "tiny-falcon", "oasst-sample"]))


def prepared(tokenizer, datasets: str, *overrides: str):
    cfg = load_config(["defaults", "tiny-falcon"], [parse_override(o) for o in (f"datasets={datasets}", *overrides)])
    return prepare_data(cfg, tokenizer)


def test_text_is_fully_supervised_and_cut_to_max_length(tokenizer) -> None:
    data = prepared(tokenizer, "[{text: {input_file_path: text_sample.txt, val_split: 0.0}}]", "max_length=16")
    samples = data.train[0].samples
    assert len(samples) > data.train[0].threads  # documents longer than 16 tokens became several pieces
    assert all(len(s.input_ids) <= 16 and s.labels == s.input_ids for s in samples)
    assert samples[-1].input_ids[-1] == tokenizer.eos_token_id


def test_exact_duplicates_are_dropped_across_sources(tokenizer) -> None:
    both = "[{dolly15k: {input_file_path: dolly_sample.jsonl}}, {alpaca: {input_file_path: alpaca_sample.json}}]"
    deduped = prepared(tokenizer, both)
    assert [r.duplicates for r in deduped.reports] == [0, 1]  # alpaca repeats one dolly conversation
    kept = prepared(tokenizer, both, "dedupe=false")
    assert [r.duplicates for r in kept.reports] == [0, 0]
    count = lambda d: sum(len(s.samples) for s in d.train + d.val)  # noqa: E731
    assert count(kept) == count(deduped) + 1


def test_language_filter_keeps_records_without_a_language(tokenizer) -> None:
    data = prepared(tokenizer, "[{chat_jsonl: {input_file_path: chat_sample.jsonl, lang: de, val_split: 0.0}}]")
    assert data.reports[0].other_language == 12  # the sample's 12 English-tagged records; 28 carry no lang
    assert data.train[0].threads == 28


def test_length_filters_drop_and_count(tokenizer) -> None:
    base = "[{dolly15k: {input_file_path: dolly_sample.jsonl, val_split: 0.0, min_length: 60, max_length: 110}}]"
    data = prepared(tokenizer, base)
    report = data.reports[0]
    assert report.too_short > 0 and report.too_long > 0
    assert all(60 <= len(s.input_ids) <= 110 for s in data.train[0].samples)
    assert len(data.train[0].samples) == report.records - report.too_short - report.too_long


def test_a_source_with_nothing_left_is_an_error(tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"datasets\[0\].dolly15k has no training samples after its filters"):
        prepared(tokenizer, "[{dolly15k: {input_file_path: dolly_sample.jsonl, min_length: 100000}}]")


def test_missing_source_file_names_path_and_key(tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"nope.jsonl.*datasets\[0\].dolly15k.input_file_path"):
        prepared(tokenizer, "[{dolly15k: {input_file_path: nope.jsonl}}]")


def test_a_relative_input_is_looked_up_in_cache_dir_then_data_dir(tokenizer, tmp_path: Path) -> None:
    # A shorter file under the bundled sample's name: the one in cache_dir is read.
    rows = (REPO / "data" / "dolly_sample.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    (tmp_path / "dolly_sample.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    both = "[{dolly15k: {input_file_path: dolly_sample.jsonl}}, {alpaca: {input_file_path: alpaca_sample.json}}]"
    data = prepared(tokenizer, both, f"cache_dir={tmp_path}", "data_cache_dir=null")
    assert [report.records for report in data.reports] == [12, 45]  # alpaca is in data_dir only


@pytest.mark.parametrize(
    ("name", "path"),
    # oasst_export reads files only, so a name of the hub's form is a missing file too.
    [("dolly15k", "nope.jsonl"), ("oasst_export", "OpenAssistant/oasst1")],
)
def test_a_missing_input_names_every_place_tried(tokenizer, tmp_path: Path, name: str, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        prepared(tokenizer, f"[{{{name}: {{input_file_path: {path}}}}}]", f"cache_dir={tmp_path}")
    message = str(caught.value)
    assert f"(set by datasets[0].{name}.input_file_path)" in message
    assert f"tried {tmp_path / path} or {REPO / 'data' / path};" in message


def test_a_malformed_record_stops_the_cli_with_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "dolly.jsonl"
    bad.write_text(json.dumps({"instruction": "Hi", "context": "", "response": "Hello"}) + "\n"
                   + json.dumps({"instruction": "Hi again", "context": ""}) + "\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "trainer_sft.py"), "--configs", "defaults", "tiny-falcon",
         f"datasets=[{{dolly15k: {{input_file_path: {bad}}}}}]", "--show_dataset_stats"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert f"{bad}, line 2: missing field 'response'" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_label_masking_every_token_carries_loss(tokenizer) -> None:
    dataset = "[{oasst_export: {input_file_path: oasst_sample.jsonl.gz, val_split: 0.1}}]"
    masked, unmasked = prepared(tokenizer, dataset), prepared(tokenizer, dataset, "label_masking=false")
    for a, b in zip(masked.train[0].samples, unmasked.train[0].samples, strict=True):
        assert a.input_ids == b.input_ids and b.labels == b.input_ids
        assert a.num_supervised < b.num_supervised  # the prompts and role tokens now too
