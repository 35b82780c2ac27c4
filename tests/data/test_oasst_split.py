"""The OASST train/validation split against the OpenAssistant trainer's rule, written out here from its
description: the trees that pass the tree filter (ready for export, prompt reviewed, prompt language in `lang`),
in file order and with the trees that give no thread, are drawn by `torch.utils.data.random_split(trees,
[1 - val_split, val_split])` with a generator seeded with `manual_seed`. Every form of OASST input must hold out
the trees this rule holds out, down to the same trees on each side."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
import torch
from torch.utils.data import random_split

from model_training.data.oasst import Message, load_oasst_export, read_export
from model_training.data.records import Conversation
from model_training.data.selection import split_like_openassistant
from model_training.data.sources import SOURCES
from model_training.data.sources.common import FilterReport, LoadContext
from model_training.data.sources.oasst1 import Oasst1Config

# torch's note that a side is empty, which val_split 0 asks for.
pytestmark = pytest.mark.filterwarnings("ignore:Length of split at index")

DATA = Path(__file__).resolve().parents[2] / "data"
TREES = DATA / "oasst_sample.jsonl.gz"
ROWS = DATA / "oasst1_sample"
DEFAULT_SEED = 287631038922
# (lang, val_split, manual_seed). The sample has 175 English trees, 15 of them without a thread, and 226 trees
# in en,de,es,fr; the flat sample 32 and 37. Lengths like 175 * 0.1 = 17.5 need torch's remainder rule (the
# remainder goes to train first: 158/17, where round() would say 18), 175 * 0.2 = 35 does not.
CASES = [
    ("en", 0.1, DEFAULT_SEED),
    ("en", 0.2, DEFAULT_SEED),
    ("en", 0.0, DEFAULT_SEED),
    ("en", 0.05, 0),
    ("en", 0.33, 42),
    ("en,de,es,fr", 0.05, DEFAULT_SEED),
    ("en,de,es,fr", 0.5, 2**40 + 7),
]


def load_oasst1(path: Path, lang: str) -> list[Conversation]:
    """Every conversation of flat oasst1 rows, through the `oasst1` source."""
    options = Oasst1Config(lang=lang, val_split=0.0)
    return SOURCES["oasst1"].load(path, options, LoadContext(FilterReport("oasst1")))[0]


def openassistant_split(trees: list[str], val_split: float, seed: int) -> tuple[list[str], list[str]]:
    generator = torch.Generator()
    generator.manual_seed(seed)
    train, val = random_split(trees, [1.0 - val_split, val_split], generator=generator)
    return list(train), list(val)


def passes_tree_filter(tree_state: str, prompt: dict, lang: str) -> bool:
    languages = lang.split(",")
    return tree_state == "ready_for_export" and bool(prompt.get("review_result")) and prompt.get("lang") in languages


def prompts_of_export(lang: str) -> list[str]:
    """The prompt id of each tree of the tree-form sample that passes the tree filter, in file order."""
    with gzip.open(TREES, "rt", encoding="utf-8") as lines:
        trees = [json.loads(line) for line in lines]
    return [t["prompt"]["message_id"] for t in trees if passes_tree_filter(t["tree_state"], t["prompt"], lang)]


def flat_rows() -> list[dict]:
    return list(datasets.load_from_disk(str(ROWS)))


def prompts_of_rows(rows: list[dict], lang: str) -> list[str]:
    """The prompt id of each tree of flat rows that passes the tree filter, trees in the order they first appear."""
    order = dict.fromkeys(row["message_tree_id"] for row in rows)
    roots = {row["message_tree_id"]: row for row in rows if row["parent_id"] is None}
    return [roots[t]["message_id"] for t in order if passes_tree_filter(roots[t]["tree_state"], roots[t], lang)]


def sides(threads: list[list[Message]], val_prompts: set[str]) -> tuple[list[list[Message]], list[list[Message]]]:
    """`threads` (all of them, in file order) divided by their tree: those of `val_prompts` validate."""
    val = [t for t in threads if t[0].message_id in val_prompts]
    return [t for t in threads if t[0].message_id not in val_prompts], val


def check_export(path: Path, prompts: list[str], lang: str, val_split: float, seed: int) -> None:
    _, expected_val = openassistant_split(prompts, val_split, seed)
    all_threads, _ = load_oasst_export(path, lang=lang, val_split=0.0)
    train, val = load_oasst_export(path, lang=lang, val_split=val_split, manual_seed=seed)
    assert (train, val) == sides(all_threads, set(expected_val))
    # The trees without threads count too: they take their places in the draw, which is drawn from these trees.
    assert [tree_id for tree_id, _ in read_export(path, lang).trees] == prompts


@pytest.mark.parametrize(("lang", "val_split", "seed"), CASES)
def test_tree_form_holds_out_the_trees_openassistant_holds_out(lang: str, val_split: float, seed: int) -> None:
    check_export(TREES, prompts_of_export(lang), lang, val_split, seed)


@pytest.mark.parametrize(("lang", "val_split", "seed"), CASES)
def test_flat_rows_hold_out_the_trees_openassistant_holds_out(
    tmp_path: Path, lang: str, val_split: float, seed: int
) -> None:
    rows = flat_rows()
    path = tmp_path / "oasst1.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    prompts = prompts_of_rows(rows, lang)
    check_export(path, prompts, lang, val_split, seed)

    # The `oasst1` dataset name reads the same rows, through the load `prepare_data` calls.
    expected_val = set(openassistant_split(prompts, val_split, seed)[1])
    options = Oasst1Config(input_file_path=str(ROWS), lang=lang, val_split=val_split, manual_seed=seed)
    train, val = SOURCES["oasst1"].load(str(ROWS), options, LoadContext(FilterReport("oasst1")))
    conversations = load_oasst1(ROWS, lang=lang)
    expected = sides([list(c.messages) for c in conversations], expected_val)
    assert ([list(c.messages) for c in train], [list(c.messages) for c in val]) == expected


def test_the_cases_cover_empty_trees_and_the_remainder_rule() -> None:
    """What makes the cases above able to fail: trees without threads, and lengths torch rounds its own way."""
    threads, _ = load_oasst_export(TREES, val_split=0.0)
    assert len(prompts_of_export("en")) == 175 and len({t[0].message_id for t in threads}) == 160
    train, val = split_like_openassistant(read_export(TREES).trees, 0.1, DEFAULT_SEED)
    assert (len(train), len(val)) == (158, 17)


def test_oasst1_reads_train_and_validation_of_a_saved_dataset_dict(tmp_path: Path) -> None:
    """OpenAssistant reads the hub's oasst1 as "train+validation", one list of trees in that order."""
    rows = flat_rows()
    cut = next(i for i, row in enumerate(rows) if i > len(rows) // 2 and row["parent_id"] is None)
    whole = datasets.Dataset.from_list(rows, features=datasets.load_from_disk(str(ROWS)).features)
    parts = datasets.DatasetDict(train=whole.select(range(cut)), validation=whole.select(range(cut, len(rows))))
    parts.save_to_disk(str(tmp_path / "oasst1"))
    assert load_oasst1(tmp_path / "oasst1", lang="en") == load_oasst1(ROWS, lang="en")
