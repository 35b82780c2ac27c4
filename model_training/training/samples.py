"""Answers of the trained model to a few prompts, written as a table at the end of training.

The QLoRA notebooks end with such a table of prompt -> answer; here it comes from the config
(`generate_samples`, `generate_val_samples`) and lands in the run folder as `samples.jsonl` and `samples.md`,
and in wandb as a table when wandb is on. Decoding is greedy, so the table is reproducible.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model_training.data.prompts import Prompt
from model_training.layout import SAMPLES_JSONL, SAMPLES_MD, record_run_file

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    max_new_tokens: int,
    partitioned: bool,
    rank: int,
    world_size: int,
) -> list[dict[str, str]] | None:
    """Greedy answers, as rows {source, prompt, answer} in the order of `prompts`, on rank 0 (None elsewhere).

    With ZeRO-3 (`partitioned`) every forward gathers weights from all ranks, so every rank generates every
    prompt in lockstep (`synced_gpus`). Otherwise each rank holds the whole model: rank r answers prompts r,
    r + world_size, ... and rank 0 gathers the rows, so no rank idles through all of them.
    """
    mine = prompts if partitioned else prompts[rank::world_size]
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    rows = []
    for prompt in mine:
        ids = torch.tensor([prompt.input_ids], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=partitioned,
        )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append({"source": prompt.source, "prompt": tokenizer.decode(prompt.input_ids), "answer": answer})
    model.train(was_training)
    if partitioned or world_size == 1:
        return rows if rank == 0 else None
    parts: list[list[dict[str, str]]] | None = [[] for _ in range(world_size)] if rank == 0 else None
    dist.gather_object(rows, parts, dst=0)
    if parts is None:
        return None
    # Rank r answered prompts r, r + world_size, ...: interleave the parts back into prompt order.
    return [parts[i % world_size][i // world_size] for i in range(len(prompts))]


def write_samples(rows: list[dict[str, str]], output_dir: Path) -> tuple[Path, Path]:
    """`samples.jsonl` (one row per line) and `samples.md` (a table) in `output_dir`."""
    jsonl, md = record_run_file(output_dir, SAMPLES_JSONL), record_run_file(output_dir, SAMPLES_MD)
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731 - one markdown cell
    lines = ["| source | prompt | answer |", "| --- | --- | --- |"]
    lines += [f"| {row['source']} | {cell(row['prompt'])} | {cell(row['answer'])} |" for row in rows]
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("wrote %d generated samples to %s", len(rows), md)
    return jsonl, md
