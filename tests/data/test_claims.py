"""Claims: one owner per piece; a claim whose owner is gone is taken again, one whose owner lives is not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model_training.data import claims
from model_training.data.claims import ClaimBoard


def test_a_piece_has_one_owner_until_it_is_released(tmp_path: Path) -> None:
    first, second = ClaimBoard(tmp_path), ClaimBoard(tmp_path)
    try:
        assert first.claim("part-000001") and not second.claim("part-000001")
        assert first.owner("part-000001") == f"{os.uname().nodename} {os.getpid()}"
        assert not second.take_if_stale("part-000001")  # its owner runs
        first.release("part-000001")
        assert first.owner("part-000001") is None and second.claim("part-000001")
    finally:
        first.close()
        second.close()
    assert not (tmp_path / "part-000001.claim").exists()  # closing gives up what is held


def test_a_claim_of_a_process_that_died_on_this_host_is_taken_at_once(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "part-000003.claim").write_text(f"{os.uname().nodename} {dead.stdout.strip()}\n")
    board = ClaimBoard(tmp_path)
    try:
        assert board.take_if_stale("part-000003") and board.claim("part-000003")
    finally:
        board.close()


def test_another_hosts_claim_is_stale_only_once_it_stops_being_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claims, "STALE_AFTER", 0.6)
    claim = tmp_path / "part-000007.claim"
    claim.write_text("another-host 12345\n")
    board = ClaimBoard(tmp_path)
    try:
        assert not board.take_if_stale("part-000007")
        for _ in range(4):  # its owner's heartbeat: the mtime moves, so the claim lives on
            time.sleep(0.3)
            os.utime(claim, ns=(time.time_ns(), claim.stat().st_mtime_ns + 1_000_000))
            assert not board.take_if_stale("part-000007")
        time.sleep(0.8)  # the heartbeat stops
        assert board.take_if_stale("part-000007") and not claim.exists()
    finally:
        board.close()


def test_the_heartbeat_touches_what_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "HEARTBEAT", 0.1)
    board = ClaimBoard(tmp_path)
    try:
        board.claim("merge")
        before = (tmp_path / "merge.claim").stat().st_mtime_ns
        time.sleep(0.5)
        assert (tmp_path / "merge.claim").stat().st_mtime_ns > before
    finally:
        board.close()
