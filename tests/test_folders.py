"""Atomic folder replacement: the new folder appears whole, the old one is gone, a crash loses neither."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model_training.folders import discard_folder, hidden_sibling, replace_folder


def folder_with(path: Path, text: str) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "weights.txt").write_text(text)
    return path


@pytest.mark.parametrize("durable", [False, True])
def test_a_staged_folder_takes_the_place_of_the_old_one(tmp_path: Path, durable: bool) -> None:
    final = folder_with(tmp_path / "model", "old")
    staged = folder_with(tmp_path / ".model.partial", "new")
    aside = tmp_path / ".model.replaced"
    replace_folder(staged, final, aside=aside, durable=durable)
    assert (final / "sub" / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_staged_folder_lands_where_nothing_was(tmp_path: Path) -> None:
    staged = folder_with(tmp_path / ".model.partial", "new")
    replace_folder(staged, tmp_path / "model", aside=tmp_path / ".model.replaced")
    assert (tmp_path / "model" / "sub" / "weights.txt").read_text() == "new"
    assert not staged.exists()


def test_a_leftover_aside_folder_of_a_crashed_writer_is_cleared_first(tmp_path: Path) -> None:
    final = folder_with(tmp_path / "model", "old")
    aside = folder_with(tmp_path / ".model.replaced", "from a crash")
    replace_folder(folder_with(tmp_path / ".model.partial", "new"), final, aside=aside)
    assert (final / "sub" / "weights.txt").read_text() == "new" and not aside.exists()


def test_a_crash_before_the_new_folder_is_in_place_keeps_the_old_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = folder_with(tmp_path / "model", "old")
    staged = folder_with(tmp_path / ".model.partial", "new")
    aside = tmp_path / ".model.replaced"
    real_rename = os.rename

    def rename_then_die(source: Path, target: Path) -> None:
        if Path(source) == staged:
            raise OSError("killed")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(OSError, match="killed"):
        replace_folder(staged, final, aside=aside)
    # Nothing under the final name for an instant: the old folder is whole aside, the new one whole staged.
    assert (aside / "sub" / "weights.txt").read_text() == "old"
    assert (staged / "sub" / "weights.txt").read_text() == "new"


def test_a_discarded_folder_is_gone_and_so_is_a_leftover_of_an_earlier_discard(tmp_path: Path) -> None:
    doomed = folder_with(tmp_path / "checkpoint-000004", "old")
    aside = folder_with(tmp_path / ".deleting-checkpoint-000004", "from a crash")
    discard_folder(doomed, aside=aside)
    assert list(tmp_path.iterdir()) == []


def test_hidden_siblings_are_unique_and_beside_the_folder(tmp_path: Path) -> None:
    first, second = (hidden_sibling(tmp_path / "model", "partial") for _ in range(2))
    assert first != second and first.parent == tmp_path
    assert first.name.startswith(".model.partial-") and not first.exists()
