"""Every model family end to end: its tiny section trains on 2 CPU ranks through the real launcher (packed
batches, LIMA residual dropout, the chunked loss), export_model.py ships it, and transformers' pipeline answers
from the export unchanged. tiny-falcon's run is tests/training/test_train_e2e.py and tests/export/test_export.py."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO, check_ok, cpu_env, read_metrics, run_deepspeed, step_losses

pytestmark = pytest.mark.slow

FAMILY_RUNS = {
    # section: (the model class transformers loads the export as, embedding rows: tokenizer + 3 chat tokens,
    # padded to a multiple of 16)
    "tiny-llama": ("LlamaForCausalLM", 2512),  # data/tokenizer-llama: 2501 tokens
    "tiny-neox": ("GPTNeoXForCausalLM", 2032),  # data/tokenizer: 2023 tokens
}


@pytest.mark.parametrize("section", FAMILY_RUNS)
def test_a_family_trains_on_two_ranks_exports_and_answers_through_pipeline(section: str, tmp_path: Path) -> None:
    model_class, rows = FAMILY_RUNS[section]
    run, export = tmp_path / "run", tmp_path / "export"
    output = check_ok(run_deepspeed([
        "--configs", "defaults", section, "oasst-sample", "max_steps=8", "save_steps=8", "eval_steps=4",
        "logging_steps=1", f"output_dir={run}",
    ])).stdout
    assert "packed micro-batches, loss from hidden states in chunks" in output
    assert "residual dropout per layer: [0.0, 0.1]" in output
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert abs(losses[1] - math.log(rows)) < 0.5, losses[1]  # random weights: about ln(vocabulary)
    assert losses[8] < losses[1] - 0.3, losses
    evals = [r["eval/oasst_export/loss"] for r in read_metrics(run) if "eval/oasst_export/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]

    exported = subprocess.run(
        [sys.executable, str(REPO / "export_model.py"), str(run), "--dtype", "bf16", "--output_folder", str(export)],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]

    generator = transformers.pipeline("text-generation", model=str(export), dtype=torch.bfloat16)
    assert type(generator.model).__name__ == model_class and generator.model.dtype == torch.bfloat16
    assert generator.model.get_input_embeddings().num_embeddings == rows
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    answer = generator(chat, max_new_tokens=6, min_new_tokens=3, do_sample=False)[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and answer["content"].strip()
