"""One optimizer step through its public pieces, on the plain PyTorch engine in one process: the loss normalized by
the supervised tokens of the whole step, stand-in micro-batches that weigh nothing, and the loss seam fault tests
use (`loss.token_sums`)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from model_training.config import load_config
from model_training.data.formatting import FormattedSample
from model_training.models.builder import build_model, load_tokenizer
from model_training.training import loss
from model_training.training.batches import BatchSpec, MicroBatch, StepSamples
from model_training.training.step import PendingLosses, StepRunner
from model_training.training.torch_engine import TorchEngine, build_torch_engine

SETTINGS = {"deepspeed": False, "residual_dropout": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0,
            "gradient_accumulation_steps": 2}


def fully_supervised(length: int, start: int) -> FormattedSample:
    ids = tuple(range(start, start + length))
    return FormattedSample(ids, ids, truncated=False)


SAMPLES = [fully_supervised(7, 10), fully_supervised(5, 40), fully_supervised(9, 70)]
SUPERVISED = sum(len(s.input_ids) - 1 for s in SAMPLES)  # the first position of a sample predicts nothing


def engine_and_spec() -> tuple[TorchEngine, BatchSpec]:
    cfg = load_config(["defaults", "tiny-falcon", "oasst-sample"], list(SETTINGS.items()))
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, {})
    return build_torch_engine(model, cfg, world_size=1, total_steps=10), BatchSpec(True, tokenizer.pad_token_id, False)


def test_the_gradient_is_that_of_the_whole_steps_token_mean() -> None:
    engine, spec = engine_and_spec()
    reference = copy.deepcopy(engine.module)
    step = StepSamples([MicroBatch(SAMPLES[:1], True), MicroBatch(SAMPLES[1:], True)], SUPERVISED, tokens=21)
    (loss_sum, correct), data_time = StepRunner(engine, spec, world_size=1, dtype="fp32")(step, 0)

    # The same tokens in one batch, averaged: the gradient the step must have applied.
    inputs, labels = spec.device_batch(SAMPLES, torch.device("cpu"))
    expected_sum, expected_correct = loss.supervised_token_sums(reference(**inputs).logits, labels)
    (expected_sum / SUPERVISED).backward()
    torch.testing.assert_close(loss_sum, expected_sum.detach().double(), rtol=1e-6, atol=0)
    assert correct == expected_correct  # the step's training accuracy, beside its loss
    assert data_time > 0
    # beta1 0.9, no clipping: Adam's first moment after the first update is 0.1 x the gradient (each parameter's
    # within 1e-5 of its norm: two micro-batches sum in another order than one batch).
    for (name, param), expected in zip(engine.module.named_parameters(), reference.parameters(), strict=True):
        difference = engine.optimizer.state[param]["exp_avg"] - 0.1 * expected.grad
        assert torch.linalg.vector_norm(difference) <= 1e-5 * torch.linalg.vector_norm(0.1 * expected.grad), name


@pytest.mark.parametrize("poisoned_call", [None, 1, 2])
def test_a_stand_in_micro_batch_adds_nothing_to_the_steps_loss(
    poisoned_call: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the fault seam, `loss.token_sums` replaced as fault_worker.py does: a NaN in the counted micro-batch
    (call 1) makes the step's loss NaN and the engine skips the update; the stand-in's loss (call 2), NaN or not,
    is left out of the step's loss."""
    real_sums, calls = loss.token_sums, []

    def poisoned(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, correct = real_sums(*args, **kwargs)
        calls.append(1)
        return (loss_sum * float("nan") if len(calls) == poisoned_call else loss_sum), correct

    monkeypatch.setattr(loss, "token_sums", poisoned)
    engine, spec = engine_and_spec()
    inputs, labels = spec.device_batch(SAMPLES[:1], torch.device("cpu"))
    counted_sum, _ = real_sums(copy.deepcopy(engine.module), inputs, labels, False)
    before = [p.detach().clone() for p in engine.module.parameters()]
    step = StepSamples([MicroBatch(SAMPLES[:1], True), MicroBatch(SAMPLES[1:2], False)], 6, tokens=7)
    (loss_sum, _), _ = StepRunner(engine, spec, world_size=1, dtype="fp32")(step, 0)

    assert len(calls) == 2
    if poisoned_call == 1:
        assert torch.isnan(loss_sum)
        assert all(torch.equal(b, p) for b, p in zip(before, engine.module.parameters(), strict=True))
    else:
        torch.testing.assert_close(loss_sum, counted_sum.detach().double(), rtol=1e-6, atol=0)


@pytest.mark.usefixtures("one_rank_group")
def test_pending_losses_are_read_together_as_token_means_then_cleared() -> None:
    pending = PendingLosses()
    assert pending.read() == []
    pending.add(1, torch.tensor([12.0, 2.0], dtype=torch.float64), loss_units=4)
    pending.add(2, torch.tensor([float("nan"), 3.0], dtype=torch.float64), loss_units=3)
    (first, (loss_1, accuracy_1)), (second, (loss_2, accuracy_2)) = pending.read()
    assert (first, loss_1, accuracy_1, second, accuracy_2) == (1, 3.0, 0.5, 2, 1.0) and math.isnan(loss_2)
    assert pending.read() == []
