"""Packing and the chunked loss wired into training: the same numbers as padded batches and full logits.

The session fixtures train with the defaults (packing on, and the chunked loss on ZeRO-2); each slow test runs
the same 8 steps with one thing changed and compares step by step. A packed row whose samples attended to one
another would differ by about 5e-5 in the first loss and 3e-2 in its gradient norm, far beyond the tolerances.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_RUN, check_ok, read_metrics, run_deepspeed

from model_training.config import ConfigError, load_config, parse_override
from model_training.data.collate import collate
from model_training.data.formatting import FormattedSample
from model_training.models.builder import build_model, load_tokenizer
from model_training.training.batches import uses_chunked_loss
from model_training.training.loss import supervised_token_sums, token_sums

TINY = ["defaults", "tiny-falcon", "oasst-sample"]
ZERO2 = {"zero_optimization": {"stage": 2}}
ZERO3 = "deepspeed_config=configs/zero3_config.json"
EVAL_KEYS = ("eval/oasst_export/loss", "eval/oasst_export/accuracy")


def config(*overrides: str):
    return load_config(TINY, [parse_override(o) for o in overrides])


def fully_supervised(ids: list[int], lengths: tuple[int, ...]) -> list[FormattedSample]:
    """Prefixes of `ids` as samples whose every token carries loss."""
    return [FormattedSample(tuple(ids[:n]), tuple(ids[:n]), truncated=False) for n in lengths]


class Engine(torch.nn.Module):
    """What the trainer calls: the DeepSpeed engine, whose forward is its `module`'s."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **inputs: object) -> object:
        return self.module(**inputs)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("reference", "overrides"),
    [
        pytest.param("zero2_run", ["packing=false"], id="packing-off"),
        pytest.param("zero2_run", ["chunked_loss=false"], id="chunked-loss-off"),
        # Heavy: the packed attention replayed by checkpointing and built under zero.Init are proven exact on the
        # model alone (tests/models/test_packed_attention.py, test_builder.py); these rerun it through the CLI.
        pytest.param("zero2_run", ["gradient_checkpointing=true"], id="packing-with-checkpointing",
                     marks=pytest.mark.heavy),
        # The hook and the class swap on a model built under zero.Init; ZeRO-3 takes its loss from logits.
        pytest.param("zero3_run", [ZERO3, "packing=false"], id="zero3-packing-off", marks=pytest.mark.heavy),
    ],
)
def test_a_changed_path_gives_the_same_losses_and_gradient_norms(
    reference: str, overrides: list[str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """8 steps of 2 ranks x 8 samples per micro-batch: the losses, gradient norms and evaluations match."""
    run = tmp_path / "run"
    check_ok(run_deepspeed([*TINY_RUN, f"output_dir={run}", "save_strategy=no", *overrides]))
    expected = {r["step"]: r for r in read_metrics(request.getfixturevalue(reference))}
    actual = {r["step"]: r for r in read_metrics(run)}
    assert actual.keys() == expected.keys() == set(range(1, 9))
    for step, record in actual.items():
        assert record["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert record["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-4), step
        evaluated = [key for key in EVAL_KEYS if key in expected[step]]
        assert [key for key in EVAL_KEYS if key in record] == evaluated
        for key in evaluated:
            assert record[key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)


@pytest.mark.parametrize("section", ["tiny-falcon", "tiny-llama"])
def test_packing_reaches_the_attention_through_lora(section: str) -> None:
    """peft wraps the model; its forward must still hand the packing to the hook, and generation still works."""
    lora = ("peft.type=lora", "peft.r=4", "peft.dropout=0.0", "dtype=fp32", "residual_dropout=0.0")
    packed_cfg, padded_cfg = (load_config(["defaults", section, "oasst-sample"], [parse_override(o) for o in options])
                              for options in (lora, (*lora, "packing=false")))
    tokenizer = load_tokenizer(packed_cfg)
    packed_model, padded_model = (build_model(c, tokenizer, ZERO2) for c in (packed_cfg, padded_cfg))
    ids = tokenizer("<|prompter|>What is the capital of France?<|endoftext|><|assistant|>")["input_ids"]
    samples = fully_supervised(ids, (len(ids), 5, 9))

    losses = []
    for model, packing in ((packed_model, True), (padded_model, False)):
        batch = collate(samples, packing, tokenizer.pad_token_id)
        labels = batch.pop("labels")
        losses.append(supervised_token_sums(model(**batch).logits, labels)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)

    prompt = torch.tensor([ids])
    generated = [
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        for model in (packed_model, padded_model)
    ]
    assert torch.equal(generated[0], generated[1])


@pytest.mark.parametrize(
    ("model_config", "reason"),
    [
        ("{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 4}",
         "packed attention does not support model type 'gpt2'; supported: falcon, gpt_neox, llama, mistral, qwen2"),
        ("{model_type: falcon, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, alibi: true}",
         "packed attention needs rotary positions; this Falcon uses ALiBi"),
    ],
)
def test_packing_on_a_model_it_cannot_keep_apart_is_a_config_error(model_config: str, reason: str) -> None:
    """Never a run on samples that attend to one another: the error names what is supported and the way out."""
    cfg = config(f"model_config={model_config}")
    with pytest.raises(ConfigError) as refused:
        build_model(cfg, load_tokenizer(cfg), ZERO2)
    assert str(refused.value) == (
        f"packing=true does not fit this model: {reason}; set packing=false to train it on padded batches"
    )


def test_chunked_loss_is_used_where_the_head_is_whole_and_plain() -> None:
    cfg = config()
    model = build_model(cfg, load_tokenizer(cfg), ZERO2)
    engine = SimpleNamespace(config=ZERO2, module=model)
    assert uses_chunked_loss(cfg, engine)
    assert not uses_chunked_loss(config("chunked_loss=false"), engine)
    assert not uses_chunked_loss(cfg, SimpleNamespace(config={"zero_optimization": {"stage": 3}}, module=model))
    lora_cfg = config("peft.type=lora", "peft.r=4")
    lora_model = build_model(lora_cfg, load_tokenizer(lora_cfg), ZERO2)
    assert not uses_chunked_loss(lora_cfg, SimpleNamespace(config=ZERO2, module=lora_model))
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with pytest.raises(ConfigError, match="set chunked_loss=false"):
        uses_chunked_loss(cfg, engine)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("section", ["tiny-falcon", "tiny-llama", "tiny-neox"])
def test_chunked_token_sums_through_the_model_match_its_logits(section: str, packing: bool) -> None:
    """The hidden states the engine's forward returns with no logits kept (each family's last hidden states after
    its final norm) give the loss, accuracy and gradients of the full logits (Falcon's head is tied to the
    embeddings, so both paths reach that weight; Llama's and GPT-NeoX's heads are their own)."""
    # No residual dropout (the tiny Llama and GPT-NeoX sections have some): both paths must draw nothing random.
    overrides = ("dtype=fp32", f"packing={str(packing).lower()}", "residual_dropout=0.0")
    cfg = load_config(["defaults", section, "oasst-sample"], [parse_override(o) for o in overrides])
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, ZERO2)
    engine = Engine(model)
    ids = tokenizer("<|prompter|>Name a large animal.<|endoftext|><|assistant|>The blue whale.<|endoftext|>")
    batch = collate(fully_supervised(ids["input_ids"], (len(ids["input_ids"]), 6, 11)), packing, 0)
    labels = batch.pop("labels")

    results = []
    for chunked in (True, False):
        model.zero_grad()
        loss_sum, correct = token_sums(engine, batch, labels, chunked)
        loss_sum.backward()
        results.append((loss_sum.detach(), correct, [p.grad.clone() for p in model.parameters()]))
    (chunked_loss, chunked_correct, chunked_grads), (loss, correct, grads) = results
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=0)
    assert int(chunked_correct) == int(correct)
    # Each parameter's gradient within 1e-5 of the whole gradient's norm (its small entries differ by rounding).
    norm = torch.linalg.vector_norm(torch.cat([grad.flatten() for grad in grads]))
    for chunked_grad, grad in zip(chunked_grads, grads, strict=True):
        assert torch.linalg.vector_norm(chunked_grad - grad) <= 1e-5 * norm
