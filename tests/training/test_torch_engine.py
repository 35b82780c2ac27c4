"""The plain PyTorch engine of `--no-deepspeed` in one process: accumulation, clipping, skipped updates, precision.

A two-weight linear model keeps every expected value computable by hand; the end-to-end runs (the real trainer
against DeepSpeed, under torchrun, killed and resumed, exported) are in test_no_deepspeed_e2e.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_training.config import TrainConfig, load_config
from model_training.training.torch_engine import TorchEngine, build_torch_engine

X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])


def engine_for(model: nn.Module, **overrides: object) -> TorchEngine:
    settings = {"deepspeed": False, "learning_rate": 0.1, "lr_scheduler_type": "constant", "warmup_steps": 0,
                "weight_decay": 0.0, "max_grad_norm": 0.0, **overrides}
    cfg: TrainConfig = load_config(["defaults", "tiny-falcon", "oasst-sample"], list(settings.items()))
    return build_torch_engine(model, cfg, world_size=1, total_steps=10)


def linear(dtype: torch.dtype = torch.float32) -> nn.Linear:
    model = nn.Linear(2, 1, bias=False, dtype=dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.25]]))
    return model


def micro_step(engine: TorchEngine, rows: torch.Tensor, scale: float = 1.0) -> None:
    """What the trainer's loop does with one micro-batch: forward, backward of the (unscaled) loss, step."""
    loss = engine(rows).sum() * scale
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()


def test_an_update_applies_the_summed_gradients_of_its_micro_batches_once() -> None:
    engine = engine_for(linear(), gradient_accumulation_steps=2)
    before = engine.module.weight.detach().clone()
    assert not engine.is_gradient_accumulation_boundary()
    micro_step(engine, X[:1])
    # Not the update's last micro-batch: the gradient waits, the weights stay.
    assert torch.equal(engine.module.weight, before)
    assert torch.equal(engine.module.weight.grad, X[:1])
    assert engine.is_gradient_accumulation_boundary()
    micro_step(engine, X[1:])
    # Adam's first step moves every weight by lr * sign(gradient of both micro-batches): [4, 1] -> -0.1 each.
    assert torch.allclose(engine.module.weight, before - 0.1, atol=1e-6)
    assert engine.module.weight.grad is None
    assert engine.get_global_grad_norm() == pytest.approx(17**0.5)
    state = engine.optimizer.state[engine.module.weight]
    assert torch.allclose(state["exp_avg"], 0.1 * X.sum(0, keepdim=True))  # (1 - beta1) x the summed gradient
    assert engine.lr_scheduler.last_epoch == 1 and engine.get_lr() == [0.1]


def test_the_gradient_norm_is_clipped_to_max_grad_norm() -> None:
    engine = engine_for(linear(), max_grad_norm=1.0)
    micro_step(engine, X[:1])  # gradient [1, 2], norm sqrt(5)
    assert engine.get_global_grad_norm() == pytest.approx(5**0.5)  # reported before clipping, as DeepSpeed does
    first_moment = engine.optimizer.state[engine.module.weight]["exp_avg"]
    assert torch.linalg.vector_norm(first_moment).item() == pytest.approx(0.1, rel=1e-5)  # 0.1 x the clipped norm 1


def test_a_nonfinite_gradient_skips_the_update_and_the_schedule() -> None:
    engine = engine_for(linear(), lr_scheduler_type="linear")
    lr = engine.get_lr()
    before = engine.module.weight.detach().clone()
    micro_step(engine, X[:1], scale=float("nan"))
    assert torch.equal(engine.module.weight, before)
    assert engine.module.weight.grad is None  # dropped, not carried into the next update
    assert engine.get_lr() == lr and engine.lr_scheduler.last_epoch == 0
    assert engine.optimizer.state == {}
    micro_step(engine, X[:1])
    assert not torch.equal(engine.module.weight, before)
    assert engine.lr_scheduler.last_epoch == 1


def test_bf16_runs_forwards_under_autocast_over_fp32_master_weights() -> None:
    engine = engine_for(linear(torch.bfloat16), dtype="bf16")
    assert engine.module.weight.dtype == torch.float32
    assert engine(X).dtype == torch.bfloat16
    assert engine_for(linear())(X).dtype == torch.float32  # fp32: no autocast
