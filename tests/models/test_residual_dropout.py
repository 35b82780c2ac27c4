import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from model_training.models.builder import decoder_layers, enable_checkpointing
from model_training.models.families import FAMILIES, UnsupportedArchitectureError
from model_training.models.residual_dropout import apply_residual_dropout, residual_dropout_probabilities

VOCAB = 128
LAYERS = 4
SIZE = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4}
# Every dropout the models have of their own is off, so any change in train mode comes from residual dropout.
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
CONFIGS = {
    "falcon-7b": lambda: FalconConfig(
        **SIZE, **NO_DROPOUT, parallel_attn=True, new_decoder_architecture=False, multi_query=True, bias=False
    ),
    "falcon-40b": lambda: FalconConfig(**SIZE, **NO_DROPOUT, new_decoder_architecture=True, num_kv_heads=2),
    "falcon-sequential": lambda: FalconConfig(
        **SIZE, **NO_DROPOUT, parallel_attn=False, new_decoder_architecture=False, multi_query=False
    ),
    "llama": lambda: LlamaConfig(**SIZE, intermediate_size=64, num_key_value_heads=2, attention_dropout=0.0),
    "mistral": lambda: MistralConfig(**SIZE, intermediate_size=64, num_key_value_heads=2, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**SIZE, intermediate_size=64, num_key_value_heads=2),
    "gpt-neox-parallel": lambda: GPTNeoXConfig(**SIZE, **NO_DROPOUT, intermediate_size=64, use_parallel_residual=True),
    "gpt-neox-sequential": lambda: GPTNeoXConfig(
        **SIZE, **NO_DROPOUT, intermediate_size=64, use_parallel_residual=False
    ),
}


def build(config: PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def run(model: torch.nn.Module, input_ids: torch.Tensor, seed: int = 2):
    torch.manual_seed(seed)
    return model(input_ids, labels=input_ids, output_hidden_states=True)


@pytest.fixture(params=sorted(CONFIGS))
def config(request) -> PretrainedConfig:
    return CONFIGS[request.param]()


@pytest.mark.parametrize(
    ("num_layers", "p", "lima", "expected"),
    [
        (1, 0.3, True, [0.3]),
        (1, 0.3, False, [0.3]),
        (2, 0.3, True, [0.0, 0.3]),
        (5, 0.2, True, [0.0, 0.05, 0.1, 0.15, 0.2]),
        (5, 0.2, False, [0.2] * 5),
        (3, 0.0, True, [0.0] * 3),
    ],
)
def test_probabilities(num_layers, p, lima, expected):
    assert residual_dropout_probabilities(num_layers, p, lima) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_probability_out_of_range_is_rejected(p):
    with pytest.raises(ValueError, match="residual dropout"):
        residual_dropout_probabilities(3, p, lima=True)
    with pytest.raises(ValueError, match="residual dropout"):
        apply_residual_dropout(build(CONFIGS["llama"]()), p, lima=True)


def test_zero_probability_patches_nothing(config):
    reference = build(config).train()
    model = copy.deepcopy(reference)
    assert apply_residual_dropout(model, 0.0, lima=True) == []
    assert all(not module._forward_hooks for module in model.modules())
    assert torch.equal(run(model, batch()).logits, run(reference, batch()).logits)


def test_eval_mode_is_unchanged(config):
    reference = build(config).eval()
    model = copy.deepcopy(reference)
    assert apply_residual_dropout(model, 0.5, lima=False) == [0.5] * LAYERS
    assert torch.equal(run(model, batch()).logits, run(reference, batch()).logits)


def test_train_mode_drops_above_the_first_layer_only_with_lima(config):
    reference = build(config).train()
    model = copy.deepcopy(reference)
    apply_residual_dropout(model, 0.5, lima=True)
    patched, unpatched = run(model, batch()), run(reference, batch())
    # hidden_states[1] is the output of layer 0, which LIMA leaves alone.
    assert torch.equal(patched.hidden_states[1], unpatched.hidden_states[1])
    assert not torch.equal(patched.hidden_states[2], unpatched.hidden_states[2])
    assert not torch.allclose(patched.logits, unpatched.logits)


def test_each_sublayer_output_is_dropped_with_its_layer_probability(config):
    model = build(config).train()
    probabilities = apply_residual_dropout(model, 0.6, lima=True)
    assert probabilities == pytest.approx([0.0, 0.2, 0.4, 0.6])

    # One probe runs before the dropout hook and one after it, to see the sublayer output before and after.
    # They clone, because Falcon adds the attention output into the MLP output in place.
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}

    def probe(key):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen.setdefault(key, []).append(hidden.detach().clone())

        return hook

    family = FAMILIES[config.model_type]
    for index, layer in enumerate(decoder_layers(model)):
        for name in (family.attention, family.mlp):
            sublayer = getattr(layer, name)
            sublayer.register_forward_hook(probe((index, name)), prepend=True)
            sublayer.register_forward_hook(probe((index, name)))
    run(model, batch())

    for (index, name), (before, after) in seen.items():
        p = probabilities[index]
        kept = after != 0
        assert (before != 0).all()
        # Every surviving element is the sublayer output scaled by 1 / (1 - p), the rest are zeroed.
        torch.testing.assert_close(after[kept], before[kept] / (1 - p))
        # Between 1,024 elements the dropped share is within 4 standard deviations of p.
        assert (~kept).float().mean().item() == pytest.approx(p, abs=0.07), (index, name)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(config):
    plain = build(config).train()
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    losses, last_mlp_calls = [], []
    for model in (plain, checkpointed):
        apply_residual_dropout(model, 0.5, lima=True)
        calls = []
        decoder_layers(model)[-1].mlp.register_forward_hook(lambda *_, calls=calls: calls.append(None), prepend=True)
        loss = run(model, batch()).loss
        loss.backward()
        losses.append(loss.detach())
        last_mlp_calls.append(len(calls))
    # The checkpointed model's backward recomputed the layer, dropout included. (Prepended: torch stops a
    # recomputation once it has every saved tensor, here the mask of the MLP's dropout, before later hooks.)
    assert last_mlp_calls == [1, 2]
    assert torch.equal(*losses)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_unsupported_architecture_is_an_error_unless_disabled():
    model = build(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*falcon, gpt_neox, llama, mistral, qwen2$"):
        apply_residual_dropout(model, 0.1, lima=True)
    assert apply_residual_dropout(model, 0.0, lima=True) == []


def test_applying_twice_is_an_error():
    model = build(CONFIGS["falcon-7b"]())
    apply_residual_dropout(model.transformer, 0.1, lima=True)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_residual_dropout(model, 0.1, lima=True)


ZERO3_SCRIPT = """
import math

import deepspeed
import torch
from transformers import AutoModelForCausalLM, FalconConfig
from transformers.integrations import HfDeepSpeedConfig

from model_training.models.residual_dropout import apply_residual_dropout

deepspeed.init_distributed(dist_backend="gloo")
ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
}
config = FalconConfig(
    vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, parallel_attn=True,
    new_decoder_architecture=False, multi_query=True, bias=False, hidden_dropout=0.0, attention_dropout=0.0,
)
# While this object lives, transformers builds models inside deepspeed.zero.Init and then initializes the
# partitioned weights; a model built in a bare zero.Init keeps torch's default init (loss near 30 here).
hf_ds_config = HfDeepSpeedConfig(ds_config)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)
assert model.transformer.h[0].mlp.dense_4h_to_h.weight.numel() == 0, "parameters are not partitioned"
assert apply_residual_dropout(model, 0.5, lima=True) == [0.0, 0.25, 0.5]
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

input_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def loss(train, seed=0):
    engine.train(train)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(train):
        return engine(input_ids, labels=input_ids).loss


eval_loss = loss(False).item()
# A model whose weights zero.Init left uninitialized starts far from ln(vocab).
assert abs(eval_loss - math.log(128)) < 1.0, eval_loss
assert loss(False).item() == eval_loss
train_loss = loss(True)
assert math.isfinite(train_loss.item()) and train_loss.item() != eval_loss, (train_loss.item(), eval_loss)
engine.backward(train_loss)
engine.step()
after = loss(False).item()
assert math.isfinite(after) and after != eval_loss, (after, eval_loss)
print("ZERO3 OK", eval_loss, train_loss.item(), after)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_zero3_train_step(tmp_path):
    script = tmp_path / "zero3.py"
    script.write_text(textwrap.dedent(ZERO3_SCRIPT))
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "PYTHONPATH": str(repo),
    }
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ZERO3 OK" in result.stdout
