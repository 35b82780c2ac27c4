"""The run folder's layout: what marks an earlier run, and what replacing one removes (and keeps)."""

from __future__ import annotations

from pathlib import Path

from model_training.layout import checkpoint_name, earlier_run, foreign_files, record_run_file, remove_run, run_files


def test_an_earlier_run_is_its_checkpoints_pointer_and_metrics_and_only_those_go(tmp_path: Path) -> None:
    assert earlier_run(tmp_path / "nothing") == [] and earlier_run(tmp_path) == []
    (tmp_path / "config.yaml").write_text("a launch that failed leaves at most this")
    assert earlier_run(tmp_path) == []
    for name in (checkpoint_name(4), ".staging-checkpoint-000008", "base_model"):
        (tmp_path / name).mkdir()
    for name in ("latest", "metrics.jsonl", "samples.md", "notes.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoint-best").mkdir()  # not ours: no step in its name
    assert earlier_run(tmp_path) == [".staging-checkpoint-000008", "checkpoint-000004", "latest", "metrics.jsonl"]
    removed = remove_run(tmp_path)
    assert removed == [".staging-checkpoint-000008", "base_model", "checkpoint-000004", "config.yaml", "latest",
                       "metrics.jsonl", "samples.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-best", "notes.txt"]


def test_an_overwrite_removes_what_the_run_listed_and_keeps_the_users_samples(tmp_path: Path) -> None:
    """A run lists in .run-files what it wrote besides its checkpoints; a samples.md it did not write stays, and
    counts as the user's where a run would write one."""
    record_run_file(tmp_path, "config.yaml").write_text("the run's config")
    record_run_file(tmp_path, "config.yaml")  # listed once
    (tmp_path / checkpoint_name(4)).mkdir()
    (tmp_path / "samples.md").write_text("the user's own notes")
    assert run_files(tmp_path) == ["config.yaml"]
    assert foreign_files(tmp_path, ["config.yaml", "samples.md", "training_curves.png"]) == ["samples.md"]
    assert remove_run(tmp_path) == ["checkpoint-000004", "config.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.md"]
    assert foreign_files(tmp_path, ["samples.md"]) == ["samples.md"]  # no run left: every file is the user's
