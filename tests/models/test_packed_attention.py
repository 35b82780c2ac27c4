"""Padding-free packing: the plan, the packed row, and every supported family computing on it exactly what it
computes per sample."""

from __future__ import annotations

import pytest
import torch
from helpers import MODELS, VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GPT2Config, PreTrainedModel

from model_training.data.formatting import IGNORE_INDEX, FormattedSample
from model_training.data.packing import pack_samples
from model_training.models import packed_attention
from model_training.models.builder import compile_decoder_layers, decoder_layers, enable_checkpointing
from model_training.models.families import FAMILIES, UnsupportedArchitectureError
from model_training.models.packed_attention import PACKED_ATTENTION, enable_packed_attention
from model_training.training.loss import supervised_token_sums

LENGTHS = (7, 13, 4, 10)


def random_samples(lengths: tuple[int, ...] = LENGTHS, seed: int = 1) -> list[FormattedSample]:
    """Samples with random tokens; a random ~2/3 of the positions carry a label, the first included."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        keep = torch.rand(length, generator=generator) < 0.67
        labels = [token if keep[t] else IGNORE_INDEX for t, token in enumerate(ids)]
        samples.append(FormattedSample(tuple(ids), tuple(labels), truncated=False))
    return samples


def per_sample_losses(model: PreTrainedModel, samples: list[FormattedSample]) -> list[torch.Tensor]:
    """Each sample alone: batch of one, no padding."""
    losses = []
    for sample in samples:
        logits = model(input_ids=torch.tensor([sample.input_ids])).logits
        losses.append(supervised_token_sums(logits, torch.tensor([sample.labels]))[0])
    return losses


def packed_losses(
    model: PreTrainedModel, samples: list[FormattedSample], given: str = "cu_seq_lens"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All samples in one packed row: the loss split back per sample along cu_seq_lens, and the row's loss.

    `given`: "cu_seq_lens" passes the boundaries, "position_ids" leaves them to be found from the positions,
    "all_ones_mask" does too, with an attention_mask of ones as a padding collator would add.
    """
    batch = pack_samples(samples)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if given == "cu_seq_lens":
        inputs.update(cu_seq_lens=batch["cu_seq_lens"], max_length=batch["max_length"])
    elif given == "all_ones_mask":
        inputs.update(attention_mask=torch.ones_like(batch["input_ids"]))
    logits = model(**inputs).logits
    bounds = batch["cu_seq_lens"].tolist()
    per_sample = [
        supervised_token_sums(logits[:, start:end], batch["labels"][:, start:end])[0]
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return per_sample, supervised_token_sums(logits, batch["labels"])[0]


def gradients(model: PreTrainedModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_gradients_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float) -> None:
    """Every parameter's gradient within rtol of the whole gradient's norm."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected.values()]))
    assert norm > 0
    for name, grad in expected.items():
        error = torch.linalg.vector_norm(actual[name].float() - grad.float())
        assert error <= rtol * norm, f"{name}: gradient differs by {error / norm:.2e} of the gradient norm"


def test_pack_samples_restarts_positions_and_cuts_labels_at_boundaries() -> None:
    samples = [
        FormattedSample((5, 6, 7), (IGNORE_INDEX, 6, 7), truncated=False),
        FormattedSample((8, 9), (8, 9), truncated=False),  # a label at t=0 would be predicted across the boundary
        FormattedSample((1, 2, 3, 4), (IGNORE_INDEX, IGNORE_INDEX, 3, 4), truncated=False),
    ]
    batch = pack_samples(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 9]
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 4
    with pytest.raises(ValueError, match="empty"):
        pack_samples([])


@pytest.mark.parametrize("given", ["cu_seq_lens", "position_ids", "all_ones_mask"])
@pytest.mark.parametrize("name", MODELS)
def test_packed_row_matches_samples_one_by_one(name: str, given: str) -> None:
    model = tiny_model(name)
    samples = random_samples()
    expected = per_sample_losses(model, samples)
    expected_grads = gradients(model, torch.stack(expected).sum())

    enable_packed_attention(model)
    actual, row_loss = packed_losses(model, samples, given)
    # The row's loss, as training takes it: no label may reach across a boundary.
    actual_grads = gradients(model, row_loss)

    torch.testing.assert_close(torch.stack(actual), torch.stack(expected), rtol=1e-5, atol=0)
    torch.testing.assert_close(row_loss, torch.stack(expected).sum(), rtol=1e-5, atol=0)
    assert_gradients_match(actual_grads, expected_grads, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_the_exactness_check_catches_samples_that_attend_to_each_other(name: str) -> None:
    """The exactness tests above can fail: the same packed row attended as one sequence (its boundaries
    dropped, positions still restarting) misses the one-by-one losses by far more than their tolerance."""
    model = tiny_model(name)
    samples = random_samples()
    expected = per_sample_losses(model, samples)
    enable_packed_attention(model)
    batch = pack_samples(samples)
    tokens = batch["input_ids"].numel()
    logits = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"],
        cu_seq_lens=torch.tensor([0, tokens], dtype=torch.int32), max_length=tokens,
    ).logits
    bounds = batch["cu_seq_lens"].tolist()
    actual = [
        supervised_token_sums(logits[:, start:end], batch["labels"][:, start:end])[0]
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=0)  # the first sample sees nothing before it
    for later, alone in zip(actual[1:], expected[1:]):
        assert abs(later - alone) > 10 * 1e-5 * abs(alone), "ten times the tolerance of the exactness test"


@pytest.mark.parametrize("name", MODELS)
def test_packed_forwards_build_no_attention_mask(name: str) -> None:
    """transformers would build a tokens x tokens mask (some releases after a host sync) that packed attention
    never reads; the attention layers get a one-element stand-in, and padded batches still get a real mask."""
    model = tiny_model(name)
    enable_packed_attention(model)
    masks = []
    attention = FAMILIES[model.config.model_type].attention
    getattr(decoder_layers(model)[0], attention).register_forward_pre_hook(
        lambda _, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    batch = pack_samples(random_samples())
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens=batch["cu_seq_lens"],
          max_length=batch["max_length"])
    tokens = batch["input_ids"].shape[1]
    assert masks[0].shape == (1, 1, tokens, tokens) and masks[0].untyped_storage().nbytes() == 1
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[0, 5:] = 0
    model(input_ids=torch.randint(0, VOCAB, (2, 9)), attention_mask=attention_mask)
    assert masks[1].untyped_storage().nbytes() >= 2 * 9 * 9


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("name", MODELS)
def test_packed_gradients_match_under_gradient_checkpointing(name: str, use_reentrant: bool) -> None:
    """Checkpointed layers replay their forward in backward; the replay must attend per sample too."""
    model = tiny_model(name)
    samples = random_samples()
    expected_grads = gradients(model, torch.stack(per_sample_losses(model, samples)).sum())

    enable_packed_attention(model)
    enable_checkpointing(model, use_reentrant)
    model.train()
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    actual_grads = gradients(model, packed_losses(model, samples)[1])
    assert_gradients_match(actual_grads, expected_grads, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_padded_batches_still_use_the_models_own_attention(name: str) -> None:
    reference = tiny_model(name)
    model = tiny_model(name)
    enable_packed_attention(model)
    enable_packed_attention(model)  # a second call changes nothing
    input_ids = torch.randint(0, VOCAB, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[0, 5:] = 0
    expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    actual = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["falcon-7b", "llama"])
def test_inconsistent_packed_inputs_are_refused(name: str) -> None:
    model = tiny_model(name)
    enable_packed_attention(model)
    batch = pack_samples(random_samples())
    inputs = {key: batch[key] for key in ("input_ids", "position_ids", "cu_seq_lens")}
    with pytest.raises(ValueError, match="no padding"):
        model(**inputs, attention_mask=torch.zeros_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="takes no KV cache"):
        model(**inputs, past_key_values=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="cu_seq_lens ends at"):
        model(**{**inputs, "cu_seq_lens": batch["cu_seq_lens"][:-1]})
    skipping = batch["position_ids"].clone()
    skipping[0, 2] = 5
    with pytest.raises(ValueError, match="count 0, 1, 2"):
        model(input_ids=batch["input_ids"], position_ids=skipping)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MODELS)
def test_packed_row_matches_samples_one_by_one_in_bf16_on_cuda(name: str) -> None:
    """The same equality through varlen_attn, within bf16 tolerances (head_dim 64, as flash kernels like)."""
    model = tiny_model(name, hidden=256, heads=4).cuda().bfloat16()
    samples = random_samples(lengths=(100, 300, 37, 250))
    with torch.device("cuda"):
        expected = per_sample_losses(model, samples)
        expected_grads = gradients(model, torch.stack(expected).sum())
        enable_packed_attention(model)
        actual, row_loss = packed_losses(model, samples)
        actual_grads = gradients(model, row_loss)
    torch.testing.assert_close(torch.stack(actual), torch.stack(expected), rtol=2e-2, atol=0)
    assert_gradients_match(actual_grads, expected_grads, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_weights_under_bf16_autocast_stay_on_varlen_attn_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 without DeepSpeed: fp32 weights, forwards under autocast, where the fp32 rotary tables hand the packed
    attention fp32 queries; they must still reach varlen_attn, in bf16, not the slow per-sample loop."""
    reached = []
    varlen = packed_attention._varlen_causal
    monkeypatch.setattr(
        packed_attention, "_varlen_causal", lambda q, *rest: reached.append(q.dtype) or varlen(q, *rest)
    )
    model = tiny_model("falcon-7b", hidden=256, heads=4).cuda()
    samples = random_samples(lengths=(100, 300, 37, 250))
    with torch.device("cuda"), torch.autocast("cuda", torch.bfloat16):
        expected = per_sample_losses(model, samples)
        enable_packed_attention(model)
        actual, _ = packed_losses(model, samples)
    assert reached and set(reached) == {torch.bfloat16}
    torch.testing.assert_close(torch.stack(actual), torch.stack(expected), rtol=2e-2, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_packing_holds_when_a_wrapper_calls_forward_directly(name: str) -> None:
    """A wrapper that calls the causal LM's forward() itself skips its hooks: the decoder's catches it."""
    model = tiny_model(name).eval()
    samples = random_samples()
    with torch.no_grad():
        expected = per_sample_losses(model, samples)
        enable_packed_attention(model)
        batch = pack_samples(samples)
        logits = model.forward(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    bounds = batch["cu_seq_lens"].tolist()
    actual = [
        supervised_token_sums(logits[:, start:end], batch["labels"][:, start:end])[0]
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    torch.testing.assert_close(torch.stack(actual), torch.stack(expected), rtol=1e-5, atol=0)


def _compiled_matches_eager(backend: str, name: str) -> None:
    """Packed rows of varying lengths through compiled decoder layers: the losses and gradients of eager."""
    eager, compiled = tiny_model(name), tiny_model(name)
    assert _compile_beside(eager, compiled, backend) == 2
    _assert_compiled_matches(eager, compiled, [(7, 13, 4, 10), (9, 3, 12), (5, 16, 8, 2, 6)], 1e-5, 1e-5)


def _compile_beside(eager: PreTrainedModel, compiled: PreTrainedModel, backend: str = "inductor") -> int:
    """Packing on both models, the decoder layers of `compiled` compiled; how many were."""
    enable_packed_attention(eager)
    enable_packed_attention(compiled)
    return compile_decoder_layers(compiled, backend=backend)


def _assert_compiled_matches(
    eager: PreTrainedModel, compiled: PreTrainedModel, length_sets: list[tuple[int, ...]], loss_rtol: float,
    grad_rtol: float,
) -> None:
    for seed, lengths in enumerate(length_sets):
        samples = random_samples(lengths, seed=seed)
        expected, expected_row = packed_losses(eager, samples)
        expected_grads = gradients(eager, expected_row)
        actual, actual_row = packed_losses(compiled, samples)
        torch.testing.assert_close(torch.stack(actual), torch.stack(expected), rtol=loss_rtol, atol=0)
        assert_gradients_match(gradients(compiled, actual_row), expected_grads, rtol=grad_rtol)


# One model of each way to the attention: Falcon's class swap and the AttentionInterface's registered function.
@pytest.mark.parametrize("name", ["falcon-7b", "llama"])
def test_packed_attention_holds_in_compiled_layers(name: str) -> None:
    """What torch.compile traces (graph breaks, guards, sizes that change every step) keeps the packing exact;
    dynamo's eager backend checks the tracing in seconds, the heavy twin the generated kernels too."""
    _compiled_matches_eager("eager", name)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("name", MODELS)
def test_packed_attention_holds_in_layers_compiled_by_inductor(name: str) -> None:
    _compiled_matches_eager("inductor", name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["falcon-7b", "llama"])
def test_layers_compiled_by_inductor_match_eager_in_bf16_on_cuda(name: str) -> None:
    """The compiled layers of the GPU runs (varlen attention, fused elementwise kernels), within bf16 tolerances."""
    eager = tiny_model(name, hidden=256, heads=4).cuda().bfloat16()
    compiled = tiny_model(name, hidden=256, heads=4).cuda().bfloat16()
    _compile_beside(eager, compiled)
    with torch.device("cuda"):
        _assert_compiled_matches(eager, compiled, [(100, 300, 37, 250), (64, 500, 9)], 2e-2, 5e-2)


@pytest.mark.parametrize("name", ["falcon-7b", "llama"])
def test_attention_dropout_is_refused(name: str) -> None:
    model = tiny_model(name)
    model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="applies no attention dropout"):
        enable_packed_attention(model)


def test_an_unsupported_model_type_is_refused_by_name() -> None:
    """GPT-2 has no rotary positions to restart: packed, its samples would attend to one another."""
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"^packed attention does not support model type 'gpt2'; supported: falcon, gpt_neox, "
                             r"llama, mistral, qwen2$"):
        enable_packed_attention(model)


@pytest.mark.parametrize("name", MODELS)
def test_a_saved_config_keeps_its_own_attention_implementation(name: str, tmp_path) -> None:
    """The registered attention is this process's; a saved model (checkpoint, export) must load anywhere."""
    model = tiny_model(name)
    enable_packed_attention(model)
    model.config.save_pretrained(tmp_path)
    assert PACKED_ATTENTION not in (tmp_path / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert reloaded.config._attn_implementation == "sdpa"
