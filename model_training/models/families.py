"""The model families this trainer knows, and where each one's attention and MLP sit in a decoder layer.

One table, read by residual dropout (the attention and MLP outputs it drops), LoRA (the linear layers it
targets by default) and packed attention (which way a family attends per sample). Known paths, not a search:
a module that merely looks like a decoder layer must never be patched or targeted by accident, and a model
type that is not here is refused by name rather than trained on a guess.

The names are transformers' own. Each decoder layer's attention and MLP outputs join the residual stream:
one after the other (Llama, Mistral, Qwen2; Falcon and GPT-NeoX when sequential), or added together first
(Falcon-7B's parallel attention, Falcon-40B's new decoder architecture, GPT-NeoX's parallel residual, Pythia's).

    model type              layers           attention: its linear layers          MLP: its linear layers
    falcon                  transformer.h    self_attention: query_key_value, dense mlp: dense_h_to_4h, dense_4h_to_h
    llama, mistral, qwen2   model.layers     self_attn: q_proj, k_proj, v_proj, o_proj
                                                                                   mlp: gate_proj, up_proj, down_proj
    gpt_neox                gpt_neox.layers  attention: query_key_value, dense     mlp: dense_h_to_4h, dense_4h_to_h
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """A feature was asked for on a model type whose decoder layout this trainer does not know."""


@dataclass(frozen=True)
class Family:
    """Where one model family keeps what the trainer reaches into, by transformers' module names."""

    layers: str
    """Attribute of the base model (`model.base_model`) that holds the decoder layers, bottom first."""
    attention: str
    """Each decoder layer's attention sublayer; its output joins the residual stream."""
    mlp: str
    """Each decoder layer's MLP sublayer; its output joins the residual stream."""
    attention_linears: tuple[str, ...]
    """The linear layers inside the attention sublayer (projections in and out)."""
    mlp_linears: tuple[str, ...]
    """The linear layers inside the MLP sublayer."""
    attention_interface: bool
    """Whether the attention dispatches through transformers' `AttentionInterface` (`config._attn_implementation`);
    Falcon picks its attention class from a table of its own and takes no registered function."""
    kv_heads: str | None
    """The config attribute that counts the key/value heads, which must divide the attention heads (grouped-query
    attention); None: every head has its own."""

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear layer of attention and MLP: LoRA's default targets."""
        return self.attention_linears + self.mlp_linears


_LLAMA = Family(
    layers="layers",
    attention="self_attn",
    mlp="mlp",
    attention_linears=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp_linears=("gate_proj", "up_proj", "down_proj"),
    attention_interface=True,
    kv_heads="num_key_value_heads",
)

FAMILIES: dict[str, Family] = {
    "falcon": Family(
        layers="h",
        attention="self_attention",
        mlp="mlp",
        attention_linears=("query_key_value", "dense"),
        mlp_linears=("dense_h_to_4h", "dense_4h_to_h"),
        attention_interface=False,
        kv_heads="num_kv_heads",
    ),
    # Llama's layout is shared by Mistral (sliding-window attention) and Qwen2 (biased q/k/v projections).
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt_neox": Family(
        layers="layers",
        attention="attention",
        mlp="mlp",
        attention_linears=("query_key_value", "dense"),
        mlp_linears=("dense_h_to_4h", "dense_4h_to_h"),
        attention_interface=True,
        kv_heads=None,
    ),
}
"""Every supported model type (`config.model_type`) and its family."""


def family(model_type: str | None, feature: str) -> Family:
    """The family of `model_type`; UnsupportedArchitectureError naming `feature` and every supported type else."""
    try:
        return FAMILIES[model_type]  # type: ignore[index]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"{feature} does not support model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def shape_mistake(config: Any, given: Collection[str]) -> str | None:
    """What is wrong with the shape a transformers config asks for (the head counts must divide what they split),
    which transformers says only as the model is built, if at all; None when nothing is. `given`: the keys the
    user set."""
    known = FAMILIES.get(config.model_type)
    heads = config.num_attention_heads
    # The Llama family may set head_dim apart from hidden_size / heads; transformers checks what it allows.
    if heads and "head_dim" not in given and config.hidden_size % heads:
        return (f"'hidden_size' ({config.hidden_size}) is not a multiple of 'num_attention_heads' ({heads}); expected "
                "hidden_size = heads x head size")
    kv_heads = getattr(config, known.kv_heads, None) if known and known.kv_heads else None
    if kv_heads and heads % kv_heads:
        return (f"'{known.kv_heads}' ({kv_heads}) does not divide 'num_attention_heads' ({heads}); expected a divisor, "
                "each key/value head serving as many attention heads")
    return None


def model_family(model: nn.Module, feature: str) -> Family:
    """The family of a transformers causal LM or base model, from its config's model type."""
    return family(getattr(getattr(model, "config", None), "model_type", None), feature)

