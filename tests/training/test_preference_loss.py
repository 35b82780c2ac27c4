"""The preference stages' losses (training/preference_loss.py) against direct computations on tiny models, float64."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from model_training.config import DpoConfig, load_config
from model_training.data.formatting import IGNORE_INDEX
from model_training.data.preferences import PreferenceGroup, format_comparison
from model_training.data.records import Comparison, Message
from model_training.models.builder import build_model, load_tokenizer
from model_training.training.preference_loss import (
    PreferenceSpec,
    compute_references,
    load_references,
    ranking_sums,
    save_references,
)

REPLIES = ["The capital of France is Paris.", "Paris.", "I think it is Lyon.", "Look it up yourself."]


def comparison(k: int, prompt: str = "What is the capital of France?") -> Comparison:
    prefix = (Message("prompter", prompt, "p"),)
    return Comparison(prefix, tuple(REPLIES[:k]))


def tiny(stage: str) -> tuple[torch.nn.Module, object]:
    """The tiny Falcon of the `tiny-falcon` section as `stage` builds it (packed attention on), in float64."""
    cfg = load_config([f"defaults-{stage}", "tiny-falcon", "preference-sample"], [("deepspeed", False)], stage=stage)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, {}).double().eval()
    return model, tokenizer


@pytest.mark.parametrize("packing", [True, False])
def test_ranking_loss_equals_a_hand_computation_for_groups_of_two_three_and_four(packing: bool) -> None:
    model, tokenizer = tiny("rm")
    groups = [format_comparison(comparison(k), tokenizer, "openassistant") for k in (2, 3, 4)]
    spec = PreferenceSpec(True, packing, tokenizer.pad_token_id, DpoConfig())
    inputs, targets = spec.device_batch(groups, torch.device("cpu"))
    with torch.no_grad():
        loss_sum, correct, margin_sum = spec.sums(model, inputs, targets).tolist()

    # Each reply scored alone by transformers' own sequence classifier (the class an export loads, pooling at the
    # last token that is not the pad token), with the trained model's weights.
    pooled = AutoModelForSequenceClassification.from_config(model.config).double().eval()
    pooled.load_state_dict(model.state_dict())
    expected_loss = expected_correct = expected_margin = 0.0
    for group in groups:
        with torch.no_grad():
            rewards = [pooled(torch.tensor([s.input_ids])).logits.item() for s in group.sequences]
        for i in range(len(rewards)):
            for j in range(i + 1, len(rewards)):
                expected_loss += math.log1p(math.exp(-(rewards[i] - rewards[j])))
                expected_correct += rewards[i] > rewards[j]
                expected_margin += rewards[i] - rewards[j]
    assert spec.units(targets) == 1 + 3 + 6
    assert loss_sum == pytest.approx(expected_loss, rel=1e-9)
    assert correct == expected_correct
    assert margin_sum == pytest.approx(expected_margin, rel=1e-9, abs=1e-12)


def test_ranking_sums_count_every_ordered_pair_once() -> None:
    rewards = torch.tensor([2.0, 1.0, 0.5, 3.0, 4.0], dtype=torch.float64)  # a group of 3, then one of 2
    better, worse = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4])
    loss_sum, correct, margin = ranking_sums(rewards, better, worse).tolist()
    margins = [1.0, 1.5, 0.5, -1.0]
    assert loss_sum == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins))
    assert correct == 3
    assert margin == pytest.approx(2.0)


def direct_logp(model: torch.nn.Module, sequence) -> tuple[torch.Tensor, int]:
    """Sum of the log-probabilities of a sequence's labelled tokens, one unpacked forward, and their count."""
    ids = torch.tensor([sequence.input_ids])
    logps = torch.log_softmax(model(ids).logits[0], dim=-1)
    positions = [t for t, label in enumerate(sequence.labels) if t > 0 and label != IGNORE_INDEX]
    return sum(logps[t - 1, sequence.input_ids[t]] for t in positions), len(positions)


@pytest.mark.parametrize(("loss_type", "label_smoothing", "packing"),
                         [("sigmoid", 0.0, True), ("sigmoid", 0.2, True), ("ipo", 0.0, True), ("sigmoid", 0.0, False)])
def test_dpo_loss_and_gradients_equal_a_direct_computation(loss_type: str, label_smoothing: float,
                                                           packing: bool) -> None:
    model, tokenizer = tiny("dpo")
    options = DpoConfig(beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing)
    references = [(-40.0, -35.5), (-22.25, -30.0), (-18.0, -17.0)]
    groups = [
        PreferenceGroup(format_comparison(comparison(2, prompt), tokenizer, "openassistant").sequences, reference)
        for prompt, reference in zip(["Capital of France?", "Where is Paris?", "Name a city."], references)
    ]
    spec = PreferenceSpec(False, packing, tokenizer.pad_token_id, options)
    inputs, targets = spec.device_batch(groups, torch.device("cpu"))
    ours = spec.sums(model, inputs, targets)[0]
    ours.backward()
    our_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    expected = 0.0
    for group in groups:
        (chosen, n_chosen), (rejected, n_rejected) = (direct_logp(model, s) for s in group.sequences)
        ref_chosen, ref_rejected = group.reference
        if loss_type == "ipo":
            h = (chosen - ref_chosen) / n_chosen - (rejected - ref_rejected) / n_rejected
            expected = expected + (h - 1 / (2 * options.beta)) ** 2
        else:
            z = options.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
            e = label_smoothing
            expected = expected - (1 - e) * torch.nn.functional.logsigmoid(z) - e * torch.nn.functional.logsigmoid(-z)
    expected.backward()

    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.usefixtures("one_rank_group")
def test_references_are_the_starting_policy_and_a_checkpoint_keeps_them(tmp_path) -> None:
    model, tokenizer = tiny("dpo")
    model.train()  # compute_references switches to evaluation mode and back
    groups = [PreferenceGroup(format_comparison(comparison(2, p), tokenizer, "openassistant").sequences)
              for p in ("One?", "Two?", "Three?")]
    spec = PreferenceSpec(False, True, tokenizer.pad_token_id, DpoConfig())
    with_refs = compute_references(model, spec, groups, batch_size=2, rank=0, world_size=1)
    assert model.training
    with torch.no_grad():
        for group in with_refs:
            assert group.reference == pytest.approx([direct_logp(model.eval(), s)[0].item() for s in group.sequences],
                                                    rel=1e-9)

    save_references(tmp_path, with_refs[:2], [with_refs[2:]])
    train, val = load_references(tmp_path, groups[:2], [groups[2:]])
    assert [g.reference for g in [*train, *val[0]]] == [g.reference for g in with_refs]
    with pytest.raises(ValueError, match="holds the references of other sequences than this run's"):
        load_references(tmp_path, groups, [[]])
    (tmp_path / "reference_logps.pt").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="reference_logps.pt cannot be read"):
        load_references(tmp_path, groups[:2], [groups[2:]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_packed_preference_batches_in_bf16_on_cuda_match_float64_on_the_cpu(stage: str) -> None:
    """The rewards and log-probabilities of a packed row through varlen_attn in bf16, within bf16 tolerances of
    the same batch in float64 on the CPU (metrics: loss, accuracy, margin, ...)."""
    model, tokenizer = tiny(stage)
    groups = [format_comparison(comparison(k, p), tokenizer, "openassistant") for k, p in
              ((2, "Capital of France?"), (3, "Where is Paris?"), (2, "Name a city."))]
    if stage == "dpo":
        groups = [PreferenceGroup(g.sequences[:2], (-30.0, -31.0)) for g in groups]
    spec = PreferenceSpec(stage == "rm", True, tokenizer.pad_token_id, DpoConfig())
    with torch.no_grad():
        expected = spec.sums(model, *spec.device_batch(groups, torch.device("cpu")))
        gpu = model.to("cuda", torch.bfloat16)
        actual = spec.sums(gpu, *spec.device_batch(groups, torch.device("cuda"))).cpu()
    # The loss, then margins, rewards and log-probabilities (sums over ~100 tokens: bf16's 3 digits, compounded);
    # the accuracy is left out, a pair whose margin is near 0 may flip.
    torch.testing.assert_close(actual[0], expected[0].float(), rtol=5e-2, atol=0.1)
    torch.testing.assert_close(actual[2:], expected[2:].float(), rtol=5e-2, atol=0.1)
