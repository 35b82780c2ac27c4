"""A job's ranks prepare a dataset once between them, through the real launcher, with no collective open meanwhile;
the next launch finds it prepared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO, TINY, check_ok, run_deepspeed, write_planted_chats

WORKER = REPO / "tests" / "data" / "prepare_worker.py"


@pytest.mark.slow
def test_two_ranks_prepare_once_between_them_for_longer_than_the_collective_timeout(tmp_path: Path) -> None:
    chats = write_planted_chats(tmp_path / "chats.jsonl", 4000)
    log = tmp_path / "encoded.log"
    args = [*TINY, f"datasets=[{{chat_jsonl: {{input_file_path: {chats}}}}}]", f"data_cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'run'}", "max_steps=2"]
    # Chunks of 64 KB (11 of them), each taking 1.2 s more: the preparation takes longer than the 5 s the process
    # group's collectives may wait, which a rank waiting in a barrier for another's tokenizing would not survive.
    slow = {"PREP_LOG": str(log), "PREP_SLEEP": "1.2", "PREP_CHUNK_CHARS": "65536", "COLLECTIVE_TIMEOUT": "5"}
    first = check_ok(run_deepspeed(args, script=WORKER, **slow))
    by_process: dict[str, int] = {}
    for line in log.read_text().splitlines():
        pid, records = line.split()
        by_process[pid] = by_process.get(pid, 0) + int(records)
    assert sum(by_process.values()) == 4000 and len(by_process) == 2  # each record tokenized once, by both ranks
    seconds = float(re.search(r"chat_jsonl: tokenized cache miss; prepared in ([0-9.]+) s", first.stdout).group(1))
    assert seconds > 5
    assert "startup: first optimizer step" in first.stdout

    log.unlink()
    second = check_ok(run_deepspeed([*args, "--prepare_only"], script=WORKER, **slow))
    assert not log.exists()  # nothing tokenized again
    found = r"chat_jsonl: found .*cache/[0-9a-f]{64}  3[0-9]{3} train \+ [0-9]+ validation samples"
    assert re.search(found, second.stdout)
    assert second.stdout.count("token stores in") == 1  # rank 0 alone says so
