"""Time and peak memory of the OASST export loader on a synthetic full-size export.

    python bench/loader_speed.py [--trees 70000] [--workdir /tmp/oasst-bench]

The export is the bundled sample's trees repeated with fresh ids until it has `--trees` trees (a real
export has about 70k trees, ~300 MB of JSON); the load runs in a fresh process that reports its own time
and peak RSS, for lang="en" with and without top_k=1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MEASURE = """
import resource, sys, time
from model_training.data.oasst import load_oasst_export
start = time.perf_counter()
train, val = load_oasst_export(sys.argv[1], lang="en", top_k=None if sys.argv[2] == "none" else int(sys.argv[2]))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"top_k={sys.argv[2]:>4}  threads train/val {len(train)}/{len(val)}  {seconds:.1f} s  peak RSS {peak:.0f} MiB")
"""


def _renamed(node: dict, suffix: str) -> dict:
    node = dict(node)
    node["message_id"] = f"{node['message_id']}-{suffix}"
    if node.get("parent_id"):
        node["parent_id"] = f"{node['parent_id']}-{suffix}"
    node["replies"] = [_renamed(r, suffix) for r in node.get("replies", [])]
    return node


def write_export(path: Path, trees: int) -> None:
    with gzip.open(REPO / "data" / "oasst_sample.jsonl.gz", "rt", encoding="utf-8") as f:
        sample = [json.loads(line) for line in f]
    with open(path, "w", encoding="utf-8") as out:
        for i in range(trees):
            tree = sample[i % len(sample)]
            suffix = str(i)
            out.write(json.dumps({**tree, "message_tree_id": f"{tree['message_tree_id']}-{suffix}",
                                  "prompt": _renamed(tree["prompt"], suffix)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", type=int, default=70_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/oasst-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    export = args.workdir / f"export-{args.trees}.jsonl"
    if not export.exists():
        write_export(export, args.trees)
    print(f"{export}: {args.trees} trees, {export.stat().st_size / 2**20:.0f} MiB")
    for top_k in ("none", "1"):
        subprocess.run([sys.executable, "-c", MEASURE, str(export), top_k], cwd=REPO, check=True)


if __name__ == "__main__":
    main()
