"""The preference stages' data: ranked replies from each source (`Source.compare`), formatted into groups of
sequences, and the errors a bad record gets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_oasst import EN, node, tree

from model_training.config import ConfigError, load_config
from model_training.data.formatting import IGNORE_INDEX, format_conversation
from model_training.data.oasst import load_oasst_export
from model_training.data.preferences import PreferenceGroup, best_versus_each, format_comparison, keep_end
from model_training.data.prepare import prepare_data
from model_training.data.records import Comparison, FileFormatError, Message
from model_training.data.sources import SOURCES
from model_training.data.sources.common import ComparisonSplits, FilterReport, LoadContext
from model_training.models.builder import load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data"


def compare(name: str, path: str | Path, **options: object) -> ComparisonSplits:
    source = SOURCES[name]
    context = LoadContext(FilterReport(name), f"datasets[0].{name}.input_file_path")
    return source.compare(path, source.options(**options), context)


def texts(comparison: Comparison) -> tuple[list[str], list[str]]:
    return [m.text for m in comparison.prefix], list(comparison.replies)


def write_lines(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_source_with_ranked_replies_is_tested_here() -> None:
    assert {name for name, source in SOURCES.items() if source.compare is not None} == {
        "oasst_export", "oasst1", "hh_rlhf", "preference_jsonl"}


def test_oasst_groups_are_prefixes_ending_on_a_prompter_with_their_ranked_replies_best_first(tmp_path: Path) -> None:
    export = tree(node(
        "p1", "prompter", "Capital of France?",
        node("a1", "assistant", "Lyon.", rank=1),
        node("a0", "assistant", "Paris.", node(
            "p2", "prompter", "And of Italy?",
            node("b1", "assistant", "Rome, I believe.", rank=1),
            node("b0", "assistant", "Rome.", rank=0),
            node("b2", "assistant", "Milan.", rank=2, deleted=True),  # deleted: not compared
        ), rank=0),
        node("a2", "assistant", "No idea."),  # no rank: not compared
        **EN,
    ))
    lonely = tree(node("q1", "prompter", "Hi?", node("c0", "assistant", "Hello.", rank=0), **EN))  # one ranked reply
    path = write_lines(tmp_path / "export.jsonl", [export, lonely])

    train, val = compare("oasst_export", path, val_split=0.0)

    assert val == []
    assert [texts(c) for c in train] == [
        (["Capital of France?"], ["Paris.", "Lyon."]),
        (["Capital of France?", "Paris.", "And of Italy?"], ["Rome.", "Rome, I believe."]),
    ]


def test_oasst_groups_are_split_by_tree_like_the_sft_threads() -> None:
    """The bundled export: a group lands on the side where the SFT split puts the threads of its tree."""
    sft_train, sft_val = load_oasst_export(DATA / "oasst_sample.jsonl.gz", val_split=0.2, manual_seed=7)
    train, val = compare("oasst_export", DATA / "oasst_sample.jsonl.gz", val_split=0.2, manual_seed=7)
    assert len(train) + len(val) == 95 and val
    roots = {side: {thread[0].message_id for thread in threads} for side, threads in (("train", sft_train),
                                                                                        ("val", sft_val))}
    assert {c.prefix[0].message_id for c in train} <= roots["train"]
    assert {c.prefix[0].message_id for c in val} <= roots["val"]
    assert all(len(c.replies) >= 2 and c.prefix[-1].role == "prompter" for c in train + val)


def test_oasst1_rows_give_the_groups_of_the_export_they_came_from() -> None:
    flat_train, flat_val = compare("oasst1", DATA / "oasst1_sample", val_split=0.0)
    export_train, _ = compare("oasst_export", DATA / "oasst_sample.jsonl.gz", val_split=0.0)
    assert flat_val == [] and flat_train
    def keys(comparisons: list[Comparison]) -> set[tuple]:
        return {(tuple(m.message_id for m in c.prefix), c.replies) for c in comparisons}

    assert keys(flat_train) <= keys(export_train)


def test_hh_rlhf_pairs_share_the_conversation_before_their_last_replies(tmp_path: Path) -> None:
    train, val = compare("hh_rlhf", DATA / "hh_rlhf_sample.jsonl.gz", val_split=0.0)
    assert len(train) == 35 and val == []
    assert texts(train[0]) == (["How can I sleep better?"], [train[0].replies[0], "Just try harder."])

    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    other = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Go away."}
    path = write_lines(tmp_path / "hh.jsonl", [good, other, {"chosen": good["chosen"]}])
    with pytest.raises(FileFormatError, match=r"hh.jsonl, line 2: fields 'chosen' and 'rejected' differ before"):
        compare("hh_rlhf", path)
    train, val = compare("hh_rlhf", path, skip_invalid=True, val_split=0.0)
    assert [texts(c) for c in train] == [(["Hi"], ["Hello!", "Go away."])]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Hi", "chosen": "Hello!"}, "line 2: missing field 'rejected'"),
        ({"prompt": "Hi", "chosen": "Hello!", "rejected": " Hello! "}, "line 2: field 'chosen' and field 'rejected' "
                                                                       "are the same text"),
        ({"chosen": "Hello!", "rejected": "No."}, "line 2: needs exactly one of the fields 'prompt' and 'messages'"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "A",
          "rejected": "B"}, "line 2: message 2 \\(assistant\\) is last; the conversation before the ranked replies "
                            "must end with a prompter turn"),
        ({"prompt": "Hi", "chosen": "", "rejected": "No."}, "line 2: field 'chosen' is empty"),
    ],
)
def test_a_bad_preference_record_names_file_line_and_field_or_is_skipped(
    tmp_path: Path, row: dict, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    path = write_lines(tmp_path / "prefs.jsonl", [good, row, good | {"prompt": "Capital of Italy?"}])
    with pytest.raises(FileFormatError, match=rf"prefs.jsonl, {message}"):
        compare("preference_jsonl", path)
    with caplog.at_level(logging.WARNING):
        train, _ = compare("preference_jsonl", path, skip_invalid=True, val_split=0.0)
    assert [c.prefix[0].text for c in train] == ["Capital of France?", "Capital of Italy?"]
    assert "skipped 1 invalid record(s)" in caplog.text


def test_preference_file_reads_prompts_and_conversations_with_a_system_message() -> None:
    train, val = compare("preference_jsonl", DATA / "preference_sample.jsonl", val_split=0.0)
    assert len(train) == 40 and val == []
    assert texts(train[0]) == (["What is the capital of France?"], ["The capital of France is Paris.",
                                                                    "Look it up yourself."])
    assert train[1].system and [m.role for m in train[1].prefix] == ["prompter", "assistant", "prompter"]


def test_a_missing_or_damaged_preference_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "prefs.jsonl"
    key = r"datasets\[0\]\.preference_jsonl\.input_file_path"
    with pytest.raises(FileNotFoundError, match=rf"{missing} \(set by {key}\)"):
        compare("preference_jsonl", missing)
    damaged = tmp_path / "prefs.jsonl.gz"
    damaged.write_bytes(b"not gzip at all\n")
    with pytest.raises(FileFormatError, match=r"prefs\.jsonl\.gz, line 1: not gzip data"):
        compare("preference_jsonl", damaged)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_config(["defaults-rm", "tiny-falcon", "preference-sample"], stage="rm"))


def test_each_reply_is_its_whole_conversation_with_loss_on_that_reply_alone(tokenizer) -> None:
    prefix = (Message("prompter", "Capital of France?", "p"), Message("assistant", "Paris.", "a"),
              Message("prompter", "And of Italy?", "q"))
    group = format_comparison(Comparison(prefix, ("Rome.", "Milan.")), tokenizer, "openassistant")
    for sequence, reply in zip(group.sequences, ("Rome.", "Milan.")):
        whole = format_conversation([*prefix, Message("assistant", reply, "r")], tokenizer, None)
        assert sequence.input_ids == whole.input_ids
        labelled = [t for t, label in zip(sequence.input_ids, sequence.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == reply + tokenizer.eos_token  # the earlier reply "Paris." has none
    assert group.loss_units == 1 and group.num_tokens == sum(len(s.input_ids) for s in group.sequences)


def test_a_long_sequence_keeps_its_end_and_dpo_pairs_the_best_with_each_other(tokenizer) -> None:
    group = format_comparison(Comparison((Message("prompter", "Hi " * 30, "p"),), ("A.", "B.", "C.")), tokenizer,
                              "openassistant")
    sequence = group.sequences[0]
    cut = keep_end(sequence, 8)
    assert cut.input_ids == sequence.input_ids[-8:] and cut.truncated
    assert cut.labels == (IGNORE_INDEX, *sequence.labels[-7:])
    assert keep_end(sequence, 1000) is sequence
    pairs = best_versus_each(list(group.sequences))
    assert pairs == [list(group.sequences[:2]), [group.sequences[0], group.sequences[2]]]
    assert PreferenceGroup(group.sequences).loss_units == 3


def test_a_source_of_the_other_kind_is_a_config_error(tokenizer) -> None:
    from model_training.data.preferences import prepare_preferences

    rm = load_config(["defaults-rm", "tiny-falcon", "oasst-hh-dolly"], stage="rm")
    with pytest.raises(ConfigError, match=r"datasets\[2\].dolly15k has no ranked replies for the rm stage; "
                                          r"sources that have them: oasst_export, oasst1, hh_rlhf, preference_jsonl"):
        prepare_preferences(rm, tokenizer)
    sft = load_config(["defaults", "tiny-falcon"], [("datasets", [{"preference_jsonl": {}}]), ("data_cache_dir", None)])
    with pytest.raises(ConfigError, match=r"datasets\[0\].preference_jsonl holds ranked replies, not conversations"):
        prepare_data(sft, tokenizer)


def test_show_dataset_stats_counts_groups_and_pairs_of_the_bundled_preference_data(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from model_training.cli import main_train

    argv = ["--configs", "defaults-rm", "tiny-falcon", "preference-sample", "data_cache_dir=null",
            "--show_dataset_stats"]
    assert main_train(argv, stage="rm") == 0
    rows = {tuple(line.split()[:2]): line.split()[2:4] for line in capsys.readouterr().out.splitlines()[1:]}
    # The sample export's 95 ranked groups (77 of two replies, 18 of three) split by tree; hh-rlhf's and the
    # preference file's pairs split by record.
    assert rows[("oasst_export", "train")] == ["85", "119"] and rows[("oasst_export", "val")] == ["10", "12"]
    assert rows[("hh_rlhf", "train")] == ["31", "31"] and rows[("preference_jsonl", "val")] == ["4", "4"]
    assert main_train(argv, stage="dpo") == 2  # defaults-rm names the rm stage
    argv[1] = "defaults-dpo"
    assert main_train(argv, stage="dpo") == 0
    rows = {tuple(line.split()[:2]): line.split()[2:4] for line in capsys.readouterr().out.splitlines()[1:]}
    # Best against each: K - 1 pairs of a group of K, each its own sample (68 groups of two, 17 of three).
    assert rows[("oasst_export", "train")] == ["102", "102"]


@pytest.mark.parametrize("stage, overrides", [
    ("rm", ("max_length=24", "val_max_length=40")),
    ("dpo", ("max_length=32", "datasets=[{oasst_export: {input_file_path: oasst_sample.jsonl.gz, lang: en, "
             "val_split: 0.1, min_length: 12}}]")),
])
def test_stored_groups_are_what_formatting_each_comparison_gives(
    tmp_path: Path, stage: str, overrides: tuple[str, ...]
) -> None:
    from model_training.config import parse_override
    from model_training.data.preferences import StoredGroups, prepare_preferences

    cfg = load_config([f"defaults-{stage}", "tiny-falcon", "preference-sample"],
                      [parse_override(o) for o in (f"data_cache_dir={tmp_path}", *overrides)], stage=stage)
    tokenizer = load_tokenizer(cfg)
    data = prepare_preferences(cfg, tokenizer)
    for (name, options), train, val in zip(cfg.dataset_specs, data.train, data.val, strict=True):
        assert isinstance(train.samples, StoredGroups)
        path = DATA / options.input_file_path
        for groups, comparisons, limit in zip((train.samples, val.samples), compare(name, path, **vars(options)),
                                              (cfg.max_length, cfg.val_max_length or cfg.max_length)):
            expected = []
            for comparison in comparisons:
                group = format_comparison(comparison, tokenizer, cfg.chat_format)
                lengths = [len(s.input_ids) for s in group.sequences]
                if min(lengths) < options.min_length:
                    continue
                cut = [keep_end(s, limit) for s in group.sequences]
                expected += [PreferenceGroup(tuple(p)) for p in best_versus_each(cut)] if stage == "dpo" else [
                    PreferenceGroup(tuple(cut))]
            assert list(groups) == expected
    assert any(s.truncated for g in data.train[0].samples for s in g.sequences)  # the cut matters
    again = prepare_preferences(cfg, tokenizer)
    assert again.cached == [True] * len(data.train)
    assert [list(s.samples) for s in again.train] == [list(s.samples) for s in data.train]
