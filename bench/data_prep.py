"""Data preparation at scale, side by side in one process tree on one generated file: tokens/s and memory.

    python bench/data_prep.py [--conversations 20000] [--text_mb 0] [--workdir /tmp/data-prep-bench]

One chat_jsonl file of two-turn conversations is generated (their texts drawn from the bundled OASST sample's
messages, joined to realistic lengths; each prompt numbered, so none repeats), and each path below prepares it in a
fresh process, one after the other, with the bundled byte-level BPE tokenizer (data/tokenizer, with the chat tokens):

  ours-cold      prepare_data into an empty cache folder (a miss: streamed, tokenized on every core, stored)
  ours-warm      prepare_data again (a hit: the store is checked and mapped)
  ours-2-ranks   two processes started together as the ranks of one node (LOCAL_SIZE=2), an empty cache folder:
                 they share the work; the CPU time is both processes' together
  datasets-1     `datasets.load_dataset("json")` + `map(apply_chat_template, batched=True)`, 1 process (the tokenizer's
                 own threads on)
  datasets-all   the same with num_proc = every core
  limit          the fast tokenizer's batch encode of the rendered texts on every core (rendering not timed): the
                 physical limit of tokenizing here

Each path reports tokens/s (tokens of the prepared data over the preparation's wall time, imports and the tokenizer's
load excluded), the CPU seconds it took (its forked processes' included), its peak RSS (the largest of the process and
the processes it forked), and the anonymous memory (RssAnon) it still holds per token after preparing, over what it
held before. With --text_mb N a text file of N MB (paragraphs of the same messages) is
prepared too by the `text` source, whose reading is streamed: its peak RSS shows what memory a large file costs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "data" / "tokenizer"

MEASURE = r"""
import json, os, resource, sys, time
from pathlib import Path

def rss_anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

path, data, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
from transformers import AutoTokenizer
from model_training.data.formatting import prepare_tokenizer
tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(os.environ["BENCH_TOKENIZER"]))
source = "text" if data.suffix == ".txt" else "chat_jsonl"
if path.startswith("ours"):
    from model_training.config import load_config, parse_override
    from model_training.data.prepare import prepare_data
    cfg = load_config(["defaults", "tiny-falcon"], [parse_override(o) for o in (
        f"datasets=[{{{source}: {{input_file_path: {data}}}}}]", f"data_cache_dir={cache}", "max_length=2048")])
elif path.startswith("datasets"):
    import datasets
    datasets.disable_progress_bars()
before, start, cpu = rss_anon(), time.perf_counter(), time.process_time()
if path.startswith("ours"):
    prepared = prepare_data(cfg, tokenizer)
    tokens = sum(len(split.samples.store.ids) for split in prepared.train)
elif path.startswith("datasets"):
    rows = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=cache)
    workers = os.cpu_count() if path == "datasets-all" else None
    mapped = rows.map(lambda batch: {"input_ids": tokenizer.apply_chat_template(batch["messages"], tokenize=True,
                      return_dict=False)}, batched=True, num_proc=workers, remove_columns=rows.column_names)
    tokens = sum(len(ids) for ids in mapped["input_ids"])
    del mapped
else:  # limit: the texts rendered first (not timed), then one batch encode on every core
    if source == "text":
        texts = [t for t in data.read_text().split("\n\n") if t.strip()]
    else:
        texts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in open(data)]
    # The faster of the library's own threads (TOKENIZERS_PARALLELISM) and one Python thread per core.
    from concurrent.futures import ThreadPoolExecutor
    backend = tokenizer.backend_tokenizer
    cores = len(os.sched_getaffinity(0))
    # In batches of 1024 texts whose encodings are dropped at once, as a preparation would (holding 100M tokens'
    # encodings at once would measure the memory, not the tokenizer).
    encode = lambda part: sum(len(e.ids) for at in range(0, len(part), 1024)
                              for e in backend.encode_batch_fast(part[at : at + 1024], add_special_tokens=False))
    best = None
    for threads in (1, cores):
        before, start, cpu = rss_anon(), time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            tokens = sum(pool.map(encode, [texts[i::threads] for i in range(threads)]))
        if best is None or time.perf_counter() - start < best[1]:
            best = (before, time.perf_counter() - start, time.process_time() - cpu)
    before, seconds, cpu = best
if path == "limit":
    seconds, cpu = best[1], best[2]
else:
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
held = rss_anon() - before
# The preparation runs in processes the measured one forks: the largest of them counts.
peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) * 1024
cpu_children = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu += cpu_children.ru_utime + cpu_children.ru_stime
print(json.dumps({"path": path, "tokens": tokens, "seconds": seconds, "cpu": cpu, "peak": peak, "held": held}))
"""


def _messages() -> tuple[list[str], list[str]]:
    """The bundled OASST sample's prompter and assistant texts."""
    prompts, replies = [], []
    with gzip.open(REPO / "data" / "oasst_sample.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            pending = [json.loads(line)["prompt"]]
            while pending:
                node = pending.pop()
                (prompts if node["role"] == "prompter" else replies).append(node["text"])
                pending += node.get("replies", [])
    return prompts, replies


def write_chats(path: Path, count: int, seed: int = 0) -> None:
    """`count` two-turn chat_jsonl conversations of about 1,700 characters, each prompt numbered."""
    prompts, replies = _messages()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for index in range(count):
            prompt = " ".join(rng.choices(prompts, k=rng.randint(2, 6))) + f" (#{index})"
            reply = "\n".join(rng.choices(replies, k=rng.randint(20, 50)))
            out.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": reply}]}) + "\n")


def write_text(path: Path, megabytes: int, seed: int = 0) -> None:
    """A .txt file of `megabytes` MB: documents of 5 to 60 lines, separated by blank lines."""
    _, replies = _messages()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        while out.tell() < megabytes * 1_000_000:
            out.write("\n".join(rng.choices(replies, k=rng.randint(5, 60))).replace("\n\n", "\n") + "\n\n")


def measure(path: str, data: Path, cache: Path, **env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, path, str(data), str(cache)], cwd=REPO, check=True,
                            env={**os.environ, "BENCH_TOKENIZER": str(TOKENIZER), **env}, capture_output=True,
                            text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def two_ranks(data: Path, cache: Path) -> dict:
    """Two processes as the two ranks of one node, started together: their wall time and CPU time together."""
    env = {**os.environ, "BENCH_TOKENIZER": str(TOKENIZER), "LOCAL_SIZE": "2", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    ranks = [subprocess.Popen([sys.executable, "-c", MEASURE, "ours-2-ranks", str(data), str(cache)], cwd=REPO,
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    reports = [json.loads(rank.communicate()[0].strip().splitlines()[-1]) for rank in ranks]
    launch = time.perf_counter() - start
    return {"path": "ours-2-ranks", "tokens": reports[0]["tokens"], "seconds": max(r["seconds"] for r in reports),
            "cpu": sum(r["cpu"] for r in reports), "peak": max(r["peak"] for r in reports),
            "held": max(r["held"] for r in reports), "launch": launch}


def row(report: dict, limit: float) -> str:
    rate = report["tokens"] / report["seconds"]
    return (f"| {report['path']} | {report['tokens']:,} | {report['seconds']:.1f} | {rate:,.0f} | {rate / limit:.2f} | "
            f"{report['cpu']:.1f} | {report['peak'] / 2**20:,.0f} | {report['held'] / report['tokens']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--text_mb", type=int, default=0, help="also prepare a text file of this many MB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/data-prep-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    chats = args.workdir / f"chats-{args.conversations}.jsonl"
    if not chats.exists():
        write_chats(chats, args.conversations)
    print(f"{chats}: {args.conversations} conversations, {chats.stat().st_size / 1e6:.0f} MB; {os.cpu_count()} cores")
    fresh = lambda name: args.workdir / f"cache-{name}-{time.time_ns()}"  # noqa: E731
    parallel = {"TOKENIZERS_PARALLELISM": "true"}
    cold_cache = fresh("ours")
    reports = [
        measure("limit", chats, fresh("limit"), **parallel),
        measure("ours-cold", chats, cold_cache, TOKENIZERS_PARALLELISM="false"),
        measure("ours-warm", chats, cold_cache, TOKENIZERS_PARALLELISM="false"),
        two_ranks(chats, fresh("ranks")),
        measure("datasets-1", chats, fresh("datasets-1"), **parallel),
        measure("datasets-all", chats, fresh("datasets-all"), **parallel),
    ]
    limit = reports[0]["tokens"] / reports[0]["seconds"]
    print("| path | tokens | s | tokens/s | x limit | CPU s | peak RSS MiB | RssAnon held B/token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for report in reports:
        print(row(report, limit))
    cold, ranks = reports[1], reports[3]
    print(f"CPU time of 2 ranks / 1 process: {ranks['cpu'] / cold['cpu']:.2f}")
    if args.text_mb:
        text = args.workdir / f"text-{args.text_mb}mb.txt"
        if not text.exists():
            write_text(text, args.text_mb)
        print(f"{text}: {text.stat().st_size / 1e6:.0f} MB")
        print(row(measure("ours-cold", text, fresh("text"), TOKENIZERS_PARALLELISM="false"), limit))
    for cache in args.workdir.glob("cache-*"):  # the stores and datasets' caches: up to GBs each
        shutil.rmtree(cache)


if __name__ == "__main__":
    main()
