"""The prompts of the sample table: given queries, then distinct openings of validation conversations."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from model_training.data.formatting import FormattedSample, prepare_tokenizer
from model_training.data.prepare import TokenizedSplit
from model_training.data.prompts import sample_prompts
from model_training.training.samples import write_samples

DATA = Path(__file__).resolve().parents[2] / "data"


def split(name: str, samples: list[FormattedSample]) -> TokenizedSplit:
    return TokenizedSplit(name=name, samples=samples, threads=len(samples), turns=0, truncated=0, dropped=0)


def test_prompts_skip_plain_text_and_repeated_openings(tmp_path: Path) -> None:
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(DATA / "tokenizer"), "human_bot")
    chat = FormattedSample((5, 6, 7, 8), (-100, -100, 7, 8), truncated=False)
    same_opening = FormattedSample((5, 6, 9), (-100, -100, 9), truncated=False)
    text = FormattedSample((10, 11, 12), (10, 11, 12), truncated=False)  # supervised from its first token
    other = FormattedSample((13, 14), (-100, 14), truncated=False)
    val = [split("text", [text]), split("chat", [chat, same_opening, other])]
    prompts = sample_prompts(["Hi?"], val, 5, tokenizer, "human_bot")
    assert [(p.source, p.input_ids) for p in prompts[1:]] == [("val/chat", (5, 6)), ("val/chat", (13,))]
    assert tokenizer.decode(prompts[0].input_ids) == "<human>: Hi?\n<bot>:"
    assert len(sample_prompts([], val, 1, tokenizer, "human_bot")) == 1

    rows = [{"source": "query", "prompt": "a | b", "answer": "line one\nline two"}]
    jsonl, md = write_samples(rows, tmp_path)
    assert md.read_text().splitlines()[2] == "| query | a \\| b | line one<br>line two |"
    assert jsonl.read_text().count("\n") == 1
