"""Exact attention over packed rows: every sample attends only to itself, for every family of `families.py`.

A packed row (`model_training.data.packing.pack_samples`) lays samples end to end, and rotary positions
restart through `position_ids`, which every supported family (Falcon, Llama, Mistral, Qwen2, GPT-NeoX) hands to
its rotary embedding. What transformers does with such a row by itself differs by family:
  * Llama, Mistral, Qwen2 and GPT-NeoX honour it: with no attention mask, their mask builder finds the restarts
    in `position_ids` and builds a block-diagonal causal mask (SDPA, eager, flex), and flash-attn takes the
    boundaries as `cu_seq_lens_*` keyword arguments, which these models pass down to the attention function.
    Exact, but the mask is tokens x tokens, finding the restarts waits for the device, and the variable-length
    kernel needs the flash-attn package.
  * Falcon does not: `FalconForCausalLM.forward` passes no `**kwargs` such as `cu_seq_lens` down to its
    layers, and it picks its attention class from its own table instead of `transformers.AttentionInterface`,
    so a registered attention function would never be called.
One mechanism serves both, differing only in how the attention itself is reached:
  * a forward pre-hook on the model reads the packing (`cu_seq_lens`, `max_length`, or restarts in
    `position_ids`) once per forward and files it under the `position_ids` tensor, which every family hands
    unchanged to every attention layer, also when gradient checkpointing replays a layer in backward; the
    decoder's hook also hands a packed forward a stand-in 4D mask, so that transformers builds no
    tokens x tokens mask (and syncs the host for none) that packed attention would never read;
  * the families that dispatch through `AttentionInterface` run `PACKED_ATTENTION`, registered there (with
    SDPA's mask builder): on a packed forward it attends per sample, else it is transformers' SDPA unchanged
    (padded batches, generation with a cache);
  * every `FalconAttention` becomes a `PackedFalconAttention` (same parameters, same weights), which does the
    same inside Falcon's own forward.
Per sample means `varlen_attn` on CUDA and a loop of causal SDPA elsewhere, with grouped key/value heads left
unexpanded and Mistral's sliding window kept within each sample. A saved config keeps the attention
implementation it had (transformers does not write `_attn_implementation` out), so exports load anywhere.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb

from model_training.models.families import model_family

PACKED_ATTENTION = "model_training_packed"
"""The attention implementation (`config._attn_implementation`) that packed models of the families that dispatch
through transformers' AttentionInterface run: per sample on packed forwards, transformers' SDPA otherwise."""


@dataclass(frozen=True)
class PackedSegments:
    """Sample boundaries of a packed forward: int32 [0, l1, l1 + l2, ..., tokens], the longest sample, tokens."""

    cu_seq_lens: torch.Tensor
    max_length: int
    tokens: int


# The packing of each forward in flight, by id() of its position_ids tensor. An entry leaves with its tensor
# (weakref.finalize), which lives as long as anything may still run the forward: a checkpointed layer keeps
# its keyword arguments, position_ids included, until its backward has replayed it.
_SEGMENTS: dict[int, PackedSegments] = {}

# Set on a model whose packing hooks are installed, so that a second call installs nothing twice.
_ENABLED = "_model_training_packed_attention"


def enable_packed_attention(model: nn.Module) -> None:
    """Make `model`'s attention exact on packed rows; unpacked inputs behave as before. Idempotent.

    A packed forward passes `position_ids` that restart at 0 for each sample, no `attention_mask` (or all
    ones) and no cache; `cu_seq_lens` and `max_length` (as `pack_samples` makes them) are optional and spare
    one device synchronization to find the boundaries. Rows of a batch are laid end to end, so a batch of
    several packed rows works too. A model type outside `families.FAMILIES` raises ValueError (naming the
    supported ones): its samples would attend to one another.
    """
    found = model_family(model, "packed attention")
    if getattr(model.config, "alibi", False):
        raise ValueError("packed attention needs rotary positions; this Falcon uses ALiBi")
    if getattr(model.config, "attention_dropout", 0.0):
        raise ValueError(
            f"packed attention applies no attention dropout; this {model.config.model_type} sets attention_dropout"
        )
    if getattr(model, _ENABLED, False):
        return
    if found.attention_interface:
        # The function and its mask builder are registered by name, once per process; the model then looks
        # its attention up under that name on every forward.
        AttentionInterface.register(PACKED_ATTENTION, _interface_attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
        model.set_attn_implementation(PACKED_ATTENTION)
    else:
        for module in model.modules():
            if isinstance(module, FalconAttention):
                # The subclass adds no state: swapping the class keeps the parameter objects, which optimizers
                # and DeepSpeed may already hold.
                module.__class__ = PackedFalconAttention
    model.register_forward_pre_hook(_packing_hook(model, outermost=True), with_kwargs=True)
    # Also on the decoder, which the causal LM always calls as a module: a wrapper that calls the causal LM's
    # forward() directly (some peft wrappers do) skips the hook above, and the samples would then attend to
    # one another silently. Here the packing comes from the restarts of position_ids.
    decoder = model.get_decoder()
    if decoder is not model:
        decoder.register_forward_pre_hook(_packing_hook(decoder, outermost=False), with_kwargs=True)
    setattr(model, _ENABLED, True)


def _packing_hook(module: nn.Module, outermost: bool) -> Callable:
    """A forward pre-hook for `module` that files the packing of each forward under its `position_ids`.

    The hook of an inner module (`outermost=False`, the decoder) leaves a forward alone whose packing the outer
    hook has filed already, and hands a packed forward a stand-in attention mask; the outer one always decides
    anew, since a live tensor can be reused for an unpacked forward.
    """
    signature = inspect.signature(module.forward)  # once: the hook runs on every forward

    def find_packing(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        cu_seq_lens = kwargs.pop("cu_seq_lens", None)
        max_length = kwargs.pop("max_length", None) if cu_seq_lens is not None else None
        arguments = signature.bind_partial(*args, **kwargs).arguments
        position_ids = arguments.get("position_ids")
        packed = position_ids is not None and id(position_ids) in _SEGMENTS
        if outermost or not packed:
            segments = _packed_segments(
                position_ids, arguments.get("attention_mask"), _kv_cache(arguments), cu_seq_lens, max_length
            )
            packed = segments is not None
            if packed:
                if id(position_ids) not in _SEGMENTS:  # else this live tensor has its finalizer already
                    weakref.finalize(position_ids, _SEGMENTS.pop, id(position_ids), None)
                _SEGMENTS[id(position_ids)] = segments
                # A cache filled from a packed row would mix samples; nothing should read one.
                kwargs["use_cache"] = False
            elif position_ids is not None:
                _SEGMENTS.pop(id(position_ids), None)  # the same tensor, reused for an unpacked forward
        if packed and not outermost:
            _hand_stand_in_mask(kwargs, arguments, position_ids)
        return args, kwargs

    return find_packing


def _hand_stand_in_mask(kwargs: dict[str, Any], arguments: dict[str, Any], position_ids: torch.Tensor) -> None:
    """Give a packed forward of the decoder a 4D attention mask that costs nothing and that nothing reads.

    transformers returns a 4D mask as it is given. Otherwise it builds a (tokens x tokens) causal mask that
    packed attention never reads, and some releases first look for packed rows in `position_ids` with a host
    sync. The stand-in is one element expanded to the mask's shape: no memory, no kernel but its fill.
    """
    if "attention_mask" in arguments and "attention_mask" not in kwargs:
        return  # given positionally: not ours to replace
    batch, length = position_ids.shape
    stand_in = torch.ones((), dtype=torch.bool, device=position_ids.device)
    kwargs["attention_mask"] = stand_in.expand(batch, 1, length, length)


def _kv_cache(arguments: dict[str, Any]) -> Any:
    """The KV cache a forward was given, under either name transformers has used for it, or None."""
    given = {**arguments.get("kwargs", {}), **arguments}
    return next((given[name] for name in ("past_key_values", "cache") if given.get(name) is not None), None)


def _packed_segments(
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    kv_cache: Any,
    cu_seq_lens: torch.Tensor | None,
    max_length: int | torch.Tensor | None,
) -> PackedSegments | None:
    """The packing of one forward, or None when the inputs are an ordinary (unpacked or padded) batch."""
    # Left-padded generation restarts positions at 0 after the padding too: padding means not packed.
    padded = attention_mask is not None and not bool(attention_mask.all())
    if cu_seq_lens is None:
        if position_ids is None or padded or kv_cache is not None:
            return None
        flat = position_ids.reshape(-1)
        starts = torch.nonzero(flat == 0).flatten()
        if len(starts) <= position_ids.shape[0]:
            return None  # one sample per row: plain causal attention is already exact
        if starts[0] != 0:
            raise ValueError("packed position_ids must start at 0")
        cu_seq_lens = torch.cat([starts, starts.new_tensor([flat.numel()])])
        segment = torch.cumsum(flat == 0, 0) - 1
        if not torch.equal(flat, torch.arange(flat.numel(), device=flat.device) - starts[segment]):
            raise ValueError("packed position_ids must count 0, 1, 2, ... within each sample")
    elif position_ids is None:
        raise ValueError("a packed forward needs position_ids that restart at 0 for each sample")
    elif kv_cache is not None:
        raise ValueError("a packed forward takes no KV cache")
    elif padded:
        raise ValueError("a packed row has no padding: pass attention_mask=None with cu_seq_lens")
    tokens = position_ids.numel()
    # Checked while still on the host: reading a device tensor's value would wait for the device.
    if cu_seq_lens.device.type == "cpu" and int(cu_seq_lens[-1]) != tokens:
        raise ValueError(f"cu_seq_lens ends at {int(cu_seq_lens[-1])} but position_ids hold {tokens} tokens")
    cu_seq_lens = cu_seq_lens.to(device=position_ids.device, dtype=torch.int32)
    if max_length is None:
        max_length = cu_seq_lens.diff().max()
    return PackedSegments(cu_seq_lens, int(max_length), tokens)


def _segments_for(position_ids: torch.Tensor | None, tokens: int) -> PackedSegments | None:
    """The packing filed for a forward of `tokens` tokens, if it is packed; ValueError if it counts others."""
    segments = _segments_of(position_ids)
    if segments is not None and segments.tokens != tokens:
        raise ValueError(f"packed position_ids hold {segments.tokens} tokens, the batch {tokens}")
    return segments


@torch.compiler.disable
def _segments_of(position_ids: torch.Tensor | None) -> PackedSegments | None:
    """The packing filed for this forward, if it is packed.

    Never compiled: torch.compile would guard on the identity of `position_ids`, a new tensor every step, and
    recompile the layer each time; left out, the lookup is one graph break and the rest of the layer compiles
    once (the samples' lengths vary from step to step, so `max_length` becomes a dynamic size).
    """
    return None if position_ids is None else _SEGMENTS.get(id(position_ids))


def _interface_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`PACKED_ATTENTION` in transformers' AttentionInterface: query (batch, heads, tokens, head_dim), key and
    value (batch, groups, tokens, head_dim) in; the output (batch, tokens, heads, head_dim), no weights, out."""
    batch, heads, length, head_dim = query.shape
    segments = _segments_for(kwargs.get("position_ids"), batch * length)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    # To the varlen layout, (tokens, heads, head_dim): the batch's rows laid end to end, as cu_seq_lens counts.
    query, key, value = (x.transpose(1, 2).flatten(0, 1) for x in (query, key, value))
    output = packed_causal_attention(
        query, key, value, segments.cu_seq_lens, segments.max_length, scale=scaling, window=sliding_window
    )
    return output.view(batch, length, heads, head_dim), None


class PackedFalconAttention(FalconAttention):
    """Falcon attention that, on a packed forward, attends within each sample only; else Falcon's own."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Falcon's forward, with the attention restricted to each sample when this forward is packed."""
        batch, length, _ = hidden_states.shape
        segments = _segments_for(kwargs.get("position_ids"), batch * length)
        if segments is None:
            return super().forward(hidden_states, *args, **kwargs)
        query, key, value = self._split_grouped(self.query_key_value(hidden_states))
        cos, sin = kwargs["position_embeddings"]
        # (batch, tokens, heads, head_dim): the heads axis is 2, where cos/sin (batch, tokens, head_dim) broadcast.
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)
        output = packed_causal_attention(
            query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1), segments.cu_seq_lens, segments.max_length
        )
        return self.dense(output.reshape(batch, length, self.num_heads * self.head_dim)), None

    def _split_grouped(self, fused_qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query (batch, tokens, heads, head_dim) and key/value with their own, fewer heads when grouped.

        Falcon's `_split_heads` broadcasts grouped keys and values to every query head (40B layout), which
        costs a copy; here they stay grouped. Query head h reads key/value group h // (heads / groups), the
        order of Falcon's fused layout and of `enable_gqa`.
        """
        batch, length, _ = fused_qkv.shape
        if self.new_decoder_architecture:
            qkv = fused_qkv.view(batch, length, self.num_kv_heads, -1, self.head_dim)
            return qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
        if self.multi_query:
            qkv = fused_qkv.view(batch, length, self.num_heads + 2, self.head_dim)
            return qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
        qkv = fused_qkv.view(batch, length, self.num_heads, 3, self.head_dim)
        return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each sample of a packed sequence, scaled by `scale` (default 1/sqrt(head_dim)).

    `query` is (tokens, heads, head_dim), `key` and `value` (tokens, groups, head_dim) with groups dividing
    heads; `cu_seq_lens` (int32) the sample boundaries, `max_length` the longest sample. With a `window`, a
    token attends to itself and the `window - 1` tokens before it in its sample (transformers' sliding window).
    On CUDA this is torch's variable-length flash attention; elsewhere `reference_packed_attention`.
    """
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # fp32 weights under autocast (bf16 without DeepSpeed): the fp32 rotary tables promote query and key to
        # fp32. Autocast runs SDPA in its own dtype but does not know varlen_attn, so the cast is made here.
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = (x.to(dtype) for x in (query, key, value))
    # Flash kernels take fp16/bf16 only; an fp32 run on a GPU (the tiny model) takes the exact loop instead.
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return _varlen_causal(query, key, value, cu_seq_lens, max_length, scale, window)
    return reference_packed_attention(query, key, value, cu_seq_lens, scale, window)


# Never compiled: the loop's length is the row's number of samples, which changes from step to step, and dynamo
# would compile the layer again for each new count until it gives up on it. Left out, it is one graph break.
@torch.compiler.disable
def reference_packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The exact packed attention: causal SDPA over each sample alone, one sample at a time."""
    grouped = key.shape[1] != query.shape[1]
    bounds = cu_seq_lens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # A window shorter than the sample needs a band mask; otherwise is_causal lets SDPA pick its kernel.
        mask = None if window is None or window >= end - start else _band(end - start, window, query.device)
        outputs.append(F.scaled_dot_product_attention(
            query[start:end].transpose(0, 1),
            key[start:end].transpose(0, 1),
            value[start:end].transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=grouped,
        ).transpose(0, 1))
    return torch.cat(outputs)


def _band(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(length, length) bool: query i sees keys i - window < j <= i, as transformers' sliding_window_overlay."""
    offset = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (offset >= 0) & (offset < window)


def _varlen_causal(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float | None,
    window: int | None,
) -> torch.Tensor:
    """`torch.nn.attention.varlen.varlen_attn`, causal, across the torch releases this project supports."""
    # window_size (left, 0): nothing to the right; -1 on the left is no limit, W - 1 keeps W tokens with itself.
    options: dict[str, Any] = {"window_size": (-1 if window is None else window - 1, 0)}
    if scale is not None and scale != query.shape[-1] ** -0.5:
        options["scale"] = scale  # only when it differs from the kernel's default, which every release has
    if key.shape[1] != query.shape[1]:
        if _varlen_takes_enable_gqa():
            options["enable_gqa"] = True
        else:
            # Where varlen_attn takes no enable_gqa: give every query head its key/value group. expand()
            # is a view for multi-query (one group); with several groups the reshape copies them.
            tokens, groups, head_dim = key.shape
            heads = query.shape[1]
            key, value = (
                x.unsqueeze(2).expand(tokens, groups, heads // groups, head_dim).reshape(tokens, heads, head_dim)
                for x in (key, value)
            )
    return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **options)


@cache
def _varlen_takes_enable_gqa() -> bool:
    """Whether this torch's varlen_attn accepts fewer key/value heads itself."""
    return "enable_gqa" in inspect.signature(varlen_attn).parameters
