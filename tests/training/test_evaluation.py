"""Evaluation through `Evaluator`, in a process group of one rank: the token mean of each validation set."""

from __future__ import annotations

import pytest
import torch

from model_training.config import load_config
from model_training.data.formatting import IGNORE_INDEX, FormattedSample
from model_training.data.prepare import TokenizedSplit
from model_training.data.windows import LengthRule
from model_training.models.builder import build_model, load_tokenizer
from model_training.training import loss
from model_training.training.batches import BatchSpec
from model_training.training.evaluation import Evaluator, without_supervised_tokens
from model_training.training.torch_engine import build_torch_engine


def fully_supervised(length: int, start: int) -> FormattedSample:
    ids = tuple(range(start, start + length))
    return FormattedSample(ids, ids, truncated=False)


def split(name: str, samples: list[FormattedSample]) -> TokenizedSplit:
    return TokenizedSplit(name=name, samples=samples, threads=len(samples), turns=0, truncated=0, dropped=0)


SAMPLES = [fully_supervised(7, 10), fully_supervised(5, 40), fully_supervised(9, 70)]


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("packing", [True, False])
def test_each_set_gives_the_token_mean_of_its_first_samples_cut_by_the_rule(packing: bool) -> None:
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], [("deepspeed", False), ("residual_dropout", 0.0)])
    tokenizer = load_tokenizer(cfg)
    engine = build_torch_engine(build_model(cfg, tokenizer, {}), cfg, world_size=1, total_steps=1)
    model = engine.module
    spec = BatchSpec(packing, tokenizer.pad_token_id, chunked=True)
    rule = LengthRule(6)
    evaluate = Evaluator([split("a", SAMPLES), split("empty", []), split("b", SAMPLES[1:])], rule, size=2,
                         batch_size=1, spec=spec, rank=0, world_size=1)
    engine.train()

    results = evaluate(engine)

    assert model.training
    assert sorted(results) == ["eval/a/accuracy", "eval/a/loss", "eval/b/accuracy", "eval/b/loss"]
    for name, samples in (("a", SAMPLES[:2]), ("b", SAMPLES[1:])):
        cut = [rule.apply(s, 0, j) for j, s in enumerate(samples)]
        assert sorted(len(s.input_ids) for s in cut) == [5, 6]  # 9 supervised tokens
        inputs, labels = spec.device_batch(cut, torch.device("cpu"))
        with torch.no_grad():
            loss_sum, correct = loss.supervised_token_sums(model(**inputs).logits, labels)
        assert results[f"eval/{name}/loss"] == pytest.approx(loss_sum.item() / 9, rel=1e-5)
        assert results[f"eval/{name}/accuracy"] == pytest.approx(correct.item() / 9)


def replied(prompt: int, reply: int) -> FormattedSample:
    """`prompt` tokens without loss, then `reply` with."""
    ids = tuple(range(prompt + reply))
    return FormattedSample(ids, (IGNORE_INDEX,) * prompt + ids[prompt:], truncated=False)


def test_a_set_whose_cut_samples_keep_no_reply_token_is_named() -> None:
    short, long = split("short", [replied(2, 3)]), split("long", [replied(4, 3), replied(5, 2), replied(3, 1)])
    rule = LengthRule(4, random_offset_probability=0.0)
    assert without_supervised_tokens([short, long], rule, size=2) == "long"  # the first 2 lose their replies
    assert without_supervised_tokens([short, long], rule, size=None) is None  # the third keeps its reply's token
    assert without_supervised_tokens([long], LengthRule(5, random_offset_probability=0.0), size=1) is None
