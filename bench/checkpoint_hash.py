"""Seconds per GB to verify a checkpoint's files against their manifest hashes: xxh3-128 (what a save records
now) against sha256 (format 1), on 1 and 4 threads, over files written to disk and dropped from nothing: the
page cache holds them after the write, so this measures hashing, not the disk.

    python bench/checkpoint_hash.py --gigabytes 2 --files 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import xxhash

from model_training.checkpoints.read import verify_checkpoint
from model_training.layout import MANIFEST


def make_checkpoint(folder: Path, gigabytes: float, files: int, kind: str) -> None:
    """`files` files of random bytes, `gigabytes` in all, and a manifest recording their `kind` hashes."""
    size = int(gigabytes * 1e9 / files)
    entries = {}
    for index in range(files):
        data = os.urandom(size)
        relative = f"global_step1/zero_pp_rank_{index}_mp_rank_00_optim_states.pt"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
        digest = xxhash.xxh3_128(data).hexdigest() if kind == "xxh3_128" else hashlib.sha256(data).hexdigest()
        entries[relative] = {"size": size, kind: digest}
    manifest = {"format_version": 2, "step": 1, "world_size": files, "deepspeed_tag": "global_step1",
                "files": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()
    print(f"{args.gigabytes} GB in {args.files} files, {os.cpu_count()} CPUs")
    for kind in ("xxh3_128", "sha256"):
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "checkpoint-000001"
            make_checkpoint(folder, args.gigabytes, args.files, kind)
            for threads in (1, 4):
                start = time.perf_counter()
                verify_checkpoint(folder, check_hashes=True, threads=threads)
                seconds = time.perf_counter() - start
                print(f"{kind:9s} {threads} thread(s): {seconds / args.gigabytes:.2f} s/GB")


if __name__ == "__main__":
    main()
