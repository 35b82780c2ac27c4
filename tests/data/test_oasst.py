import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model_training.data.oasst import FileFormatError, Message, load_oasst_export

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "oasst_sample.jsonl.gz"


def node(message_id: str, role: str, text: str, *replies: dict, **fields: object) -> dict:
    """A tree-form message; `replies` is only written when there are some, as real exports may omit it."""
    message = {"message_id": message_id, "role": role, "text": text, **fields}
    if replies:
        message["replies"] = list(replies)
    return message


def tree(prompt: dict, *, state: str = "ready_for_export") -> dict:
    return {"message_tree_id": prompt["message_id"], "tree_state": state, "prompt": prompt}


EN = {"lang": "en", "review_result": True}
DE = {"lang": "de", "review_result": True}

# Hand-written export; the comments give the rule each tree or message exercises.
TREES = [
    tree(
        node(
            "t1", "prompter", "Capital of France?",
            node(
                "t1a1", "assistant", "Paris.",
                # Answered prompter reply: a four-message thread.
                node("t1p2", "prompter", "And of Germany?", node("t1a3", "assistant", "Berlin.", lang="en")),
                # Unanswered prompter leaf that is not the first reply: no thread.
                node("t1p3", "prompter", "Thanks!"),
                rank=0, labels={"quality": {"value": 0.9, "count": 3}}, lang="en",
            ),
            # Unanswered first prompter reply: the thread ends at its assistant parent. Rank 1 fails top_k=1.
            node("t1a2", "assistant", "Lyon.", node("t1p4", "prompter", "Are you sure?"), rank=1),
            node("t1a4", "assistant", "Paris, says a model.", synthetic=True),
            **EN,
        )
    ),
    tree(
        node(
            "t2", "prompter", "Name a fruit.",
            # No rank while it has siblings: fails any top_k.
            node("t2b1", "assistant", "Apple."),
            node("t2b2", "assistant", "Banana.", rank=0, deleted=True),
            # Its only reply is deleted, so it is no leaf and no thread ends at it.
            node("t2b3", "assistant", "Cherry.", node("t2r1", "prompter", "Why?", deleted=True), rank=1),
            **EN,
        )
    ),
    tree(node("t3", "prompter", "Growing?", node("t3a", "assistant", "No."), **EN), state="growing"),
    tree(node("t4", "prompter", "Passed?", node("t4a", "assistant", "No."), lang="en", review_result=False)),
    tree(node("t5", "prompter", "Wie spät ist es?", node("t5a", "assistant", "Spät."), **DE)),
    tree(node("t6", "prompter", "Never reviewed?", node("t6a", "assistant", "Right."), lang="en")),
    tree(node("t7", "prompter", "Model prompt?", node("t7a", "assistant", "Answer."), synthetic=True, **EN)),
    # Only the required fields below the prompt, and no message_tree_id on the line.
    {
        "tree_state": "ready_for_export",
        "prompt": node("t8", "prompter", "Min?", {"message_id": "t8a", "text": "Ok.", "role": "assistant"},
                       **EN),
    },
    tree(
        node(
            "t9", "prompter", "What is 2 plus 2?",
            node(
                "t9a", "assistant", "4.",
                node(
                    "t9p", "prompter", "And times 3?",
                    node("t9x", "assistant", "12.", rank=0),
                    node("t9y", "assistant", "13.", rank=1),
                ),
            ),
            **EN,
        )
    ),
    tree(node("t10", "prompter", "Nobody answered?", **EN)),
]  # fmt: skip

T1_LONG = ["Capital of France?", "Paris.", "And of Germany?", "Berlin."]
T1_SHORT = ["Capital of France?", "Lyon."]
T2 = ["Name a fruit.", "Apple."]
T8 = ["Min?", "Ok."]
T9_X = ["What is 2 plus 2?", "4.", "And times 3?", "12."]
T9_Y = ["What is 2 plus 2?", "4.", "And times 3?", "13."]


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    lines = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as file:
            file.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def flat_rows(trees: list[dict]) -> list[dict]:
    """The trees as oasst1 dataset rows: parents first, every column present, labels as parallel lists,
    rank as a float."""
    rows = []

    def visit(message: dict, parent_id: str | None, tree_id: str, state: str) -> None:
        labels = message.get("labels")
        rank = message.get("rank")
        rows.append(
            {
                "message_id": message["message_id"],
                "parent_id": parent_id,
                "message_tree_id": tree_id,
                "tree_state": state,
                "text": message["text"],
                "role": message["role"],
                "lang": message.get("lang"),
                "review_result": message.get("review_result"),
                "deleted": message.get("deleted", False),
                "synthetic": message.get("synthetic", False),
                "rank": None if rank is None else float(rank),
                "labels": None
                if labels is None
                else {
                    "name": list(labels),
                    "value": [label["value"] for label in labels.values()],
                    "count": [label["count"] for label in labels.values()],
                },
            }
        )
        for reply in message.get("replies", []):
            visit(reply, message["message_id"], tree_id, state)

    for line in trees:
        prompt = line["prompt"]
        visit(prompt, None, line.get("message_tree_id", prompt["message_id"]), line["tree_state"])
    return rows


def texts(threads: list[list[Message]]) -> list[list[str]]:
    return [[message.text for message in thread] for thread in threads]


def load_all(path: Path, **kwargs: object) -> list[list[Message]]:
    train, val = load_oasst_export(path, val_split=0.0, **kwargs)
    assert val == []
    return train


@pytest.mark.parametrize("name", ["export.jsonl", "export.jsonl.gz"])
@pytest.mark.parametrize(
    ("lang", "top_k", "expected"),
    [
        ("en", None, [T1_LONG, T1_SHORT, T2, T8, T9_X, T9_Y]),
        ("en", 1, [T1_LONG, T8, T9_X]),
        ("en", 2, [T1_LONG, T1_SHORT, T8, T9_X, T9_Y]),
        ("de", None, [["Wie spät ist es?", "Spät."]]),
        (" en , de", 1, [T1_LONG, ["Wie spät ist es?", "Spät."], T8, T9_X]),
        ("fr", None, []),
    ],
)
def test_filter_rules_give_the_hand_computed_threads(tmp_path, name, lang, top_k, expected):
    path = write_jsonl(tmp_path / name, TREES)
    assert texts(load_all(path, lang=lang, top_k=top_k)) == expected


def test_messages_carry_role_lang_rank_and_labels(tmp_path):
    thread = load_all(write_jsonl(tmp_path / "export.jsonl", TREES))[0]
    assert [m.role for m in thread] == ["prompter", "assistant", "prompter", "assistant"]
    assert thread[1] == Message(
        role="assistant", text="Paris.", message_id="t1a1", lang="en", rank=0, labels={"quality": 0.9}
    )
    assert thread[2].lang is None and thread[2].rank is None and thread[2].labels == {}


def many_trees(count: int) -> list[dict]:
    """`count` ready trees of two threads each, whose prompt text names the tree."""
    trees = []
    for i in range(count):
        replies = [node(f"m{i}a", "assistant", "A.", rank=0), node(f"m{i}b", "assistant", "B.", rank=1)]
        trees.append(tree(node(f"m{i}", "prompter", f"q{i}", *replies, **EN)))
    return trees


def tree_names(threads: list[list[Message]]) -> list[str]:
    return [thread[0].text for thread in threads]


def test_split_is_by_tree_exact_and_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", many_trees(40))
    train, val = load_oasst_export(path, val_split=0.25)
    assert len(val) == 20 and len(train) == 60  # 10 trees and 30
    # Both threads of every tree fall on the same side.
    assert sorted(set(tree_names(train)) & set(tree_names(val))) == []
    assert all(tree_names(side).count(name) == 2 for side in (train, val) for name in tree_names(side))
    assert load_oasst_export(path, val_split=0.25) == (train, val)

    # OpenAssistant's draw picks positions in the file, whatever trees hold them: the reversed file holds out the
    # trees at the same positions.
    reordered = write_jsonl(tmp_path / "reordered.jsonl", many_trees(40)[::-1])
    mirrored = {f"q{39 - int(name[1:])}" for name in tree_names(val)}
    assert set(tree_names(load_oasst_export(reordered, val_split=0.25)[1])) == mirrored

    other_seed = load_oasst_export(path, val_split=0.25, manual_seed=1)[1]
    assert len(other_seed) == 20 and set(tree_names(other_seed)) != set(tree_names(val))


@pytest.mark.parametrize(("val_split", "val_trees"), [(0.0, 0), (0.1, 4), (0.5, 20), (1.0, 40)])
def test_val_split_is_the_fraction_of_trees(tmp_path, val_split, val_trees):
    path = write_jsonl(tmp_path / "many.jsonl", many_trees(40))
    train, val = load_oasst_export(path, val_split=val_split)
    assert len(set(tree_names(val))) == val_trees
    assert len(set(tree_names(train))) == 40 - val_trees


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ({"val_split": 1.5}, "val_split"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, argument, message):
    with pytest.raises(ValueError, match=message):
        load_oasst_export(write_jsonl(tmp_path / "x.jsonl", TREES), **argument)


@pytest.mark.parametrize("name", ["flat.jsonl", "flat.jsonl.gz", "flat.parquet"])
@pytest.mark.parametrize("top_k", [None, 1])
def test_flat_form_gives_the_same_threads_and_split(tmp_path, name, top_k):
    rows = flat_rows(TREES + many_trees(10))
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        # Missing optional fields are left out of the JSON rows, as they may be.
        write_jsonl(path, [{key: value for key, value in row.items() if value is not None} for row in rows])
    tree_form = write_jsonl(tmp_path / "trees.jsonl", TREES + many_trees(10))
    expected = load_oasst_export(tree_form, lang="en,de", top_k=top_k, val_split=0.5)
    assert load_oasst_export(path, lang="en,de", top_k=top_k, val_split=0.5) == expected
    assert len(expected[0]) + len(expected[1]) == (27 if top_k is None else 14)


GOOD = json.dumps(TREES[0])


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"message_tree_id": "x", "prompt": {"message_id": ', "invalid JSON"),
        ('["not", "a", "tree"]', "expected a JSON object"),
        (json.dumps(tree(node("x", "prompter", "Hi", **EN))).replace('"text": "Hi", ', ""), "'text'"),
        (json.dumps(tree(node("x", "prompter", "Hi", {"message_id": "y", "text": "Yo"}, **EN))), "'role'"),
        (json.dumps(tree(node("x", "prompter", "Hi", node("y", "system", "Hi"), **EN))), "unknown role"),
        (json.dumps(tree(node("x", "prompter", "Hi", node("y", "prompter", "Hi"), **EN))), "like its parent"),
        (json.dumps(tree(node("x", "assistant", "Hello.", **EN))), "expected 'prompter'"),
        (json.dumps({"message_tree_id": "x", "tree_state": "ready_for_export"}), "'prompt'"),
        (json.dumps(tree(node("x", "prompter", "Hi", rank="first", **EN))), "malformed rank"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, reason):
    path = write_jsonl(tmp_path / "broken.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(FileFormatError) as caught:
        load_oasst_export(path)
    assert f"{path}, line 3: " in str(caught.value)
    assert reason in str(caught.value)
    assert caught.value.line == 3


def test_malformed_flat_rows_name_the_row(tmp_path):
    rows = flat_rows([TREES[0]])
    orphan = {**rows[1], "message_id": "orphan", "parent_id": "nowhere"}
    path = write_jsonl(tmp_path / "flat.jsonl", [*rows, orphan])
    with pytest.raises(FileFormatError, match=rf"line {len(rows) + 1}: .*nowhere does not appear"):
        load_oasst_export(path)

    same_role = {**rows[1], "message_id": "echo", "parent_id": rows[1]["message_id"]}
    path = tmp_path / "flat.parquet"
    pq.write_table(pa.Table.from_pylist([*rows, same_role]), path)
    with pytest.raises(FileFormatError, match=rf"row {len(rows) + 1}: message echo has role 'assistant'"):
        load_oasst_export(path)


def test_skip_invalid_skips_and_counts_bad_lines(tmp_path, caplog):
    bad = ["{broken", json.dumps(tree(node("x", "assistant", "Hello.", **EN))), json.dumps({"no": "prompt"})]
    path = write_jsonl(tmp_path / "mixed.jsonl", [bad[0], TREES[0], *bad[1:], TREES[8]])
    with caplog.at_level(logging.WARNING, logger="model_training.data.oasst"):
        train, _ = load_oasst_export(path, val_split=0.0, skip_invalid=True)
    assert texts(train) == [T1_LONG, T1_SHORT, T9_X, T9_Y]
    assert "skipped 3 invalid line(s)" in caplog.text


def test_skip_invalid_drops_the_whole_tree_of_a_bad_flat_row(tmp_path, caplog):
    rows = flat_rows([TREES[0], TREES[8]])
    t1_row = next(i for i, row in enumerate(rows) if row["message_id"] == "t1a2")
    rows[t1_row] = {**rows[t1_row], "role": "user"}
    with caplog.at_level(logging.WARNING, logger="model_training.data.oasst"):
        train = load_all(write_jsonl(tmp_path / "flat.jsonl", rows), skip_invalid=True)
    assert texts(train) == [T9_X, T9_Y]
    assert "skipped 1 invalid line(s)" in caplog.text


def test_missing_file_names_path_and_config_key(tmp_path):
    missing = tmp_path / "nowhere.jsonl.gz"
    with pytest.raises(FileNotFoundError, match=r"not found: .*nowhere\.jsonl\.gz$"):
        load_oasst_export(missing)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl\.gz \(set by data\.oasst_path\)"):
        load_oasst_export(missing, config_key="data.oasst_path")


def test_bundled_sample_loads():
    train, val = load_oasst_export(SAMPLE)
    assert 200 <= len(train) + len(val) <= 600
    # The prompt's id is the tree's in the sample.
    assert 0 < len({thread[0].message_id for thread in val}) < len({thread[0].message_id for thread in train})
    for thread in train + val:
        assert [m.role for m in thread] == ["prompter", "assistant"] * (len(thread) // 2)
        assert not any(m.deleted or m.synthetic for m in thread)
    assert any(len(thread) > 2 for thread in train)
    for lang in ("de", "es", "fr"):
        train, val = load_oasst_export(SAMPLE, lang=lang)
        assert len(train) + len(val) >= 10
        assert {thread[0].lang for thread in train + val} == {lang}
