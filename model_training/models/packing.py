"""Exact attention over packed rows for transformers' Falcon: every sample attends only to itself.

A packed row (`model_training.data.packing.pack_samples`) lays samples end to end, and rotary positions
restart through `position_ids`. Whether transformers' own Falcon then keeps the samples apart depends on
the release and the attention implementation (some build a plain causal mask over the whole row), and
none of them takes the sample boundaries to a variable-length kernel without the flash-attn package:
`FalconForCausalLM.forward` passes no `**kwargs` such as `cu_seq_lens` down to its layers, and Falcon picks
its attention class from its own table instead of `transformers.AttentionInterface`, so a registered
attention function would never be called. Our exactness therefore rests on our own code, in every release.

`enable_packed_attention` works at two points that every Falcon layer sees:
  * a forward pre-hook on the model reads the packing (`cu_seq_lens`, `max_length`, or restarts in
    `position_ids`) once per forward and files it under the `position_ids` tensor, which the model hands
    unchanged to every attention layer, also when gradient checkpointing replays a layer in backward;
  * every `FalconAttention` becomes a `PackedFalconAttention` (same parameters, same weights), which on a
    packed row attends per sample (`varlen_attn` on CUDA, a loop of causal SDPA per sample elsewhere) and
    otherwise runs Falcon's own forward unchanged (padded batches, `attention_mask`, generation).
On a packed forward the decoder's hook also hands it a stand-in 4D mask, so that transformers does not build
(and sync the host for) a tokens x tokens mask that the packed attention would never read.
The config keeps `_attn_implementation` as it was, so saved and exported models load anywhere.
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
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb


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


def enable_packed_attention(model: nn.Module) -> None:
    """Make `model`'s Falcon attention exact on packed rows; unpacked inputs behave as before. Idempotent.

    A packed forward passes `position_ids` that restart at 0 for each sample, no `attention_mask` (or all
    ones) and no cache; `cu_seq_lens` and `max_length` (as `pack_samples` makes them) are optional and spare
    one device synchronization to find the boundaries. Rows of a batch are laid end to end, so a batch of
    several packed rows works too.
    """
    attentions = [module for module in model.modules() if isinstance(module, FalconAttention)]
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no Falcon attention layers; packed attention is Falcon-only")
    if getattr(model.config, "alibi", False):
        raise ValueError("packed attention needs rotary positions; this Falcon uses ALiBi")
    if getattr(model.config, "attention_dropout", 0.0):
        raise ValueError("packed attention applies no attention dropout; this Falcon sets attention_dropout")
    if all(isinstance(module, PackedFalconAttention) for module in attentions):
        return
    for module in attentions:
        # The subclass adds no state: swapping the class keeps the parameter objects, which optimizers and
        # DeepSpeed may already hold.
        module.__class__ = PackedFalconAttention
    model.register_forward_pre_hook(_packing_hook(model, outermost=True), with_kwargs=True)
    # Also on the decoder, which the causal LM always calls as a module: a wrapper that calls the causal LM's
    # forward() directly (older peft releases do) skips the hook above, and the samples would then attend to
    # one another silently. Here the packing comes from the restarts of position_ids.
    decoder = model.get_decoder()
    if decoder is not model:
        decoder.register_forward_pre_hook(_packing_hook(decoder, outermost=False), with_kwargs=True)


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


@torch.compiler.disable
def _segments_of(position_ids: torch.Tensor | None) -> PackedSegments | None:
    """The packing filed for this forward, if it is packed.

    Never compiled: torch.compile would guard on the identity of `position_ids`, a new tensor every step, and
    recompile the layer each time; left out, the lookup is one graph break and the rest of the layer compiles
    once (the samples' lengths vary from step to step, so `max_length` becomes a dynamic size).
    """
    return None if position_ids is None else _SEGMENTS.get(id(position_ids))


class PackedFalconAttention(FalconAttention):
    """Falcon attention that, on a packed forward, attends within each sample only; else Falcon's own."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Falcon's forward, with the attention restricted to each sample when this forward is packed."""
        segments = _segments_of(kwargs.get("position_ids"))
        if segments is None:
            return super().forward(hidden_states, *args, **kwargs)
        batch, length, _ = hidden_states.shape
        if batch * length != segments.tokens:
            raise ValueError(f"packed position_ids hold {segments.tokens} tokens, the batch {batch * length}")
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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int
) -> torch.Tensor:
    """Causal attention within each sample of a packed sequence, scaled by 1/sqrt(head_dim).

    `query` is (tokens, heads, head_dim), `key` and `value` (tokens, groups, head_dim) with groups dividing
    heads; `cu_seq_lens` (int32) the sample boundaries, `max_length` the longest sample. On CUDA this is
    torch's variable-length flash attention; elsewhere `reference_packed_attention`.
    """
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # fp32 weights under autocast (bf16 without DeepSpeed): the fp32 rotary tables promote query and key to
        # fp32. Autocast runs SDPA in its own dtype but does not know varlen_attn, so the cast is made here.
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = (x.to(dtype) for x in (query, key, value))
    # Flash kernels take fp16/bf16 only; an fp32 run on a GPU (the tiny model) takes the exact loop instead.
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return _varlen_causal(query, key, value, cu_seq_lens, max_length)
    return reference_packed_attention(query, key, value, cu_seq_lens)


def reference_packed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor
) -> torch.Tensor:
    """The exact packed attention: causal SDPA over each sample alone, one sample at a time."""
    grouped = key.shape[1] != query.shape[1]
    bounds = cu_seq_lens.tolist()
    outputs = [
        F.scaled_dot_product_attention(
            query[start:end].transpose(0, 1),
            key[start:end].transpose(0, 1),
            value[start:end].transpose(0, 1),
            is_causal=True,
            enable_gqa=grouped,
        ).transpose(0, 1)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs)


def _varlen_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int
) -> torch.Tensor:
    """`torch.nn.attention.varlen.varlen_attn`, causal, across the torch releases this project supports."""
    # window_size (-1, 0) is causal: no limit to the left, nothing to the right.
    options: dict[str, Any] = {"window_size": (-1, 0)}
    if key.shape[1] != query.shape[1]:
        if _varlen_takes_enable_gqa():
            options["enable_gqa"] = True
        else:
            # torch 2.11's varlen_attn has no enable_gqa: give every query head its key/value group. expand()
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
    """Whether this torch's varlen_attn accepts fewer key/value heads itself (2.13 does; older releases may not)."""
    return "enable_gqa" in inspect.signature(varlen_attn).parameters
