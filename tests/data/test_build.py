"""Preparing a store together: the same store whoever tokenizes which chunk, a stopped preparation picked up where it
stopped, the first bad record reported, and a stalled one named after its own timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import write_planted_chats

from model_training.config import ConfigError, TrainConfig, load_config, parse_override
from model_training.data import build, prepare
from model_training.data.build import PreparationStopped
from model_training.data.claims import ClaimBoard
from model_training.data.prepare import prepare_data
from model_training.data.records import FileFormatError
from model_training.data.sources import stream
from model_training.models.builder import load_tokenizer


def config(path: Path, cache: Path | None, *overrides: str) -> TrainConfig:
    datasets = f"[{{chat_jsonl: {{input_file_path: {path}}}}}]"
    return load_config(["defaults", "tiny-falcon"], [parse_override(o) for o in (
        f"datasets={datasets}", f"data_cache_dir={cache if cache else 'null'}", *overrides)])


def samples(data: prepare.PreparedData) -> list:
    return [list(split.samples) for split in data.train + data.val]


@pytest.fixture
def chats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """600 conversations in chunks of about 4 KB: some 20 chunks."""
    monkeypatch.setattr(stream, "CHUNK_CHARS", 4096)
    return write_planted_chats(tmp_path / "chats.jsonl", 600)


def chunk_count(path: Path) -> int:
    return len(list(stream.line_chunks(path, documents=False)))


class Encoded:
    """The chunks tokenized from now on, by whichever process: a line each in a file, with its number of records."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def __call__(self) -> list[int]:
        return [int(line) for line in self.log.read_text().split()] if self.log.exists() else []

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


@pytest.fixture
def encoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Encoded:
    log = Encoded(tmp_path / "encoded.log")
    real = prepare.encode_records

    def counted(records, *args, **kwargs):  # runs in the workers, which the fork gives this patch
        with open(log.log, "a") as f:
            f.write(f"{len(records)}\n")
        return real(records, *args, **kwargs)

    monkeypatch.setattr(prepare, "encode_records", counted)
    return log


def test_the_store_is_the_same_however_many_workers_tokenize(tmp_path: Path, chats: Path, encoded: Encoded) -> None:
    one = prepare_data(cfg := config(chats, tmp_path / "one", "data_workers=1"), load_tokenizer(cfg))
    two = prepare_data(cfg := config(chats, tmp_path / "two", "data_workers=2"), load_tokenizer(cfg))
    alone = prepare_data(cfg := config(chats, None), load_tokenizer(cfg))
    assert samples(one) == samples(two) == samples(alone)
    assert len(encoded()) == 3 * chunk_count(chats) and sum(encoded()) == 3 * 600  # each chunk once per preparation


def test_a_chunk_finished_between_the_look_and_the_claim_is_not_tokenized_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker looks (unfinished), then its owner renames the part into place and releases the claim, then the
    worker claims: the look after the claim sees the part, and gives the claim back."""
    board = ClaimBoard(tmp_path)
    try:
        (tmp_path / "part-000003.npz").write_bytes(b"done meanwhile")
        looks = iter([False])  # the first look came before the rename
        real = build._finished
        monkeypatch.setattr(build, "_finished", lambda work, number: next(looks, None) or real(work, number))
        assert not build._take(tmp_path, board, 3)
        assert board.owner("part-000003") is None
        assert build._take(tmp_path, board, 4) and board.owner("part-000004") == board.me
    finally:
        board.close()


def test_a_preparation_ended_by_a_stop_signal_is_a_stop_not_a_failure() -> None:
    with pytest.raises(PreparationStopped, match="SIGTERM"):
        build.in_child(lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(RuntimeError, match=r"ended with wait status 9 \(killed\?\)"):
        build.in_child(lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_a_stopped_preparation_is_picked_up_where_it_stopped(
    tmp_path: Path, chats: Path, encoded: Encoded, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(chats, tmp_path / "cache", "data_workers=1")
    tokenizer = load_tokenizer(cfg)
    counted = prepare.encode_records

    def dies_after_five(records, *args, **kwargs):
        if len(encoded()) == 5:
            raise MemoryError("the process is killed here")
        return counted(records, *args, **kwargs)

    monkeypatch.setattr(prepare, "encode_records", dies_after_five)
    with pytest.raises(MemoryError):
        prepare_data(cfg, tokenizer)
    (work,) = (tmp_path / "cache").glob(".work-*")
    assert len(list(work.glob("part-*.npz"))) == 5
    # A process killed outright leaves its claims; one of a pid that no longer runs is taken at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (work / "part-000009.claim").write_text(f"{os.uname().nodename} {dead.stdout.strip()}\n")
    monkeypatch.setattr(prepare, "encode_records", counted)
    encoded.clear()
    resumed = prepare_data(cfg, tokenizer)
    assert len(encoded()) == chunk_count(chats) - 5  # only what the first try left
    assert samples(resumed) == samples(prepare_data(config(chats, None), tokenizer))
    assert not work.exists()


def test_the_first_bad_line_is_reported_whichever_chunk_is_tokenized_first(tmp_path: Path, chats: Path) -> None:
    lines = chats.read_text().splitlines()
    lines[150] = lines[450] = '{"messages": 3}'
    chats.write_text("\n".join(lines) + "\n")
    cfg = config(chats, tmp_path / "cache", "data_workers=2")
    with pytest.raises(FileFormatError, match=r"chats\.jsonl, line 151: field 'messages' must be a list"):
        prepare_data(cfg, load_tokenizer(cfg))


def test_a_stalled_preparation_stops_after_its_own_timeout_naming_the_holder(tmp_path: Path, chats: Path) -> None:
    learn = config(chats, tmp_path / "elsewhere")
    (store,) = {split.samples.store.folder.name for split in prepare_data(learn, load_tokenizer(learn)).train}
    cfg = config(chats, tmp_path / "cache", "data_wait_timeout=1.5")
    claim = tmp_path / "cache" / f".work-{store}" / "part-000004.claim"
    claim.parent.mkdir(parents=True)
    claim.write_text("node-17 4242\n")  # another host's process holds chunk 4, and keeps its claim fresh
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(0.05):
            os.utime(claim)

    holder = threading.Thread(target=heartbeat, daemon=True)
    holder.start()
    start = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=r"chunk 4 is held by node-17 4242 .*'data_wait_timeout'"):
            prepare_data(cfg, load_tokenizer(cfg))
    finally:
        stop.set()
    assert time.monotonic() - start < 30
