"""Residual dropout with the LIMA schedule.

LIMA (Zhou et al., 2023) fine-tunes with dropout on the residual connections whose rate grows linearly with
depth: 0 at the bottom layer, ``p`` at the top. Without ``lima`` every layer gets ``p``.

The dropout is applied to the output of each attention and MLP sublayer before it joins the residual stream,
through forward hooks on those sublayer modules. A hook does not care which attention implementation runs,
is replayed as-is when activation checkpointing recomputes a layer (torch's checkpoint restores the RNG
state, so the recomputation draws the same mask), and under ZeRO-3 only sees the sublayer's output, so it
needs no gathered parameters.

Where a layer adds the attention and MLP outputs together before the residual (Falcon-7B's parallel
attention, Falcon-40B's new decoder architecture, GPT-NeoX's parallel residual), each of the two outputs is
dropped with its own mask before the sum. Which modules those are, per model type: `families.FAMILIES`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model_training.models.families import model_family

# Set on the patched list of decoder layers, which the causal-LM model and its base model share. A second
# application is an error rather than a second set of hooks, which would drop every sublayer output twice.
_MARKER = "_residual_dropout_probabilities"


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"residual dropout must be in [0, 1), got {p}")


def residual_dropout_probabilities(num_layers: int, p: float, lima: bool) -> list[float]:
    """Dropout probability of each decoder layer, bottom first.

    With ``lima`` layer ``i`` gets ``p * i / (num_layers - 1)``, so layer 0 is never dropped and the last
    layer gets ``p``; a single layer gets ``p``. Without ``lima`` every layer gets ``p``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    _check_probability(p)
    if not lima or num_layers == 1:
        return [p] * num_layers
    return [p * i / (num_layers - 1) for i in range(num_layers)]


def _dropout_hook(p: float):
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        # Returning None keeps the output untouched: eval mode stays bit-identical to the unpatched model.
        if not module.training:
            return None
        # Attention modules return (hidden_states, attention_weights); the hidden states join the residual.
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, training=True), *output[1:])
        return F.dropout(output, p, training=True)

    return hook


def apply_residual_dropout(model: torch.nn.Module, p: float, lima: bool) -> list[float]:
    """Install residual dropout on every decoder layer of a model of a family in `families.FAMILIES`.

    Works on the causal-LM model or its base model; apply it before wrapping the model (PEFT, DeepSpeed).
    Returns the per-layer probabilities, bottom first, or an empty list when ``p == 0`` (nothing is
    patched then, whatever the architecture). Applying it twice to the same model raises ``RuntimeError``.
    Layers whose probability is 0 get no hook, so they do not consume random numbers either.
    """
    _check_probability(p)
    if p == 0.0:
        return []
    found = model_family(model, "residual dropout")
    # transformers' `base_model` is the decoder stack for both the causal-LM model and the base model itself.
    layers = getattr(model.base_model, found.layers)
    if hasattr(layers, _MARKER):
        raise RuntimeError("residual dropout is already applied to this model")

    probabilities = residual_dropout_probabilities(len(layers), p, lima)
    for layer, layer_p in zip(layers, probabilities):
        if layer_p == 0.0:
            continue
        for name in (found.attention, found.mlp):
            getattr(layer, name).register_forward_hook(_dropout_hook(layer_p))
    setattr(layers, _MARKER, probabilities)
    return probabilities
