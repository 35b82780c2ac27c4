"""Read the weights of a DeepSpeed ZeRO-1/2/3 checkpoint (or a plain PyTorch one) on the CPU, one tensor at a time:
what the export (export/export.py, `read_zero_checkpoint`) and a resume on another number of ranks
(training/reshard.py, `read_optimizer_state`) read of a checkpoint's engine files.

What the engine files of one tag folder (``global_step<N>/``) hold, for a run of ``W`` data-parallel ranks:

ZeRO-1/2
    ``mp_rank_00_model_states.pt``: the whole module in the training dtype (``module``), ``param_shapes``
    (name -> shape of every parameter the optimizer owns, per param group) and ``shared_params`` (tied
    names). ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (``bf16_zero_pp_rank_...`` in bf16 runs):
    rank r's slice of each group's fp32 master weights (``single_partition_of_fp32_groups``) and, in
    ``param_slice_mappings``, where each parameter's piece lies in that slice. A parameter's pieces, in
    rank order, make up the parameter.
ZeRO-3
    ``zero_pp_rank_<r>_mp_rank_00_model_states.pt``: the same names and shapes, buffers in full, parameters
    as empty placeholders, and rank r's partition of each frozen parameter (``frozen_param_fragments``).
    The optim file of rank r holds ``fp32_flat_groups``: per group, rank r's partition of each parameter
    (``ceil(numel / W)`` values, the last rank's padded), one after another in ``param_shapes`` order.

Without DeepSpeed (training/torch_engine.py)
    ``torch_model_states.pt`` (layout.TORCH_MODEL_STATES): the module's state dict, its weights the fp32 masters
    themselves; read as it is (``zero_stage`` 0, one copy of every weight: ``world_size`` 1).

The fp32 masters are the trained weights (the module copy is their rounding to bf16/fp16), so every
parameter the optimizer owns is read from them; frozen parameters and buffers, which have no master, come
from the module (ZeRO-1/2) or the fragments (ZeRO-3).

Nothing is read whole: ``torch.load(mmap=True)`` maps the files and reads no tensor data, each
``LazyTensor`` records where its values lie, and ``LazyTensor.load`` copies them, chunk by chunk, straight
into a tensor of the wanted dtype. The pages a chunk came from are handed back to the kernel right after the
copy, so the process never holds the fp32 masters, let alone the Adam moments beside them.

``read_optimizer_state`` maps the same shards for what a resume on another number of ranks needs
(training/reshard.py): each trained parameter's fp32 master and Adam moments, whole, and the optimizer's step.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_training.layout import TORCH_MODEL_STATES, ZERO12_MODEL_STATES, ZERO_OPTIM_SHARD_RE, zero3_model_states

_CHUNK_NUMEL = 1 << 24
"""Values copied between two page releases: 64 MiB of fp32 source mapped at a time."""

# MADV_PAGEOUT asks the kernel to reclaim the pages now. It never changes data: clean file pages are read
# again if touched later, and anonymous memory without swap simply stays. Linux 5.4 and later; elsewhere
# the call fails harmlessly and the pages stay mapped until the files are closed (more RSS, same result).
_MADV_PAGEOUT = 21
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
if _LIBC is not None:
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class ZeroCheckpointError(ValueError):
    """The tag folder is not a complete ZeRO checkpoint this reader understands."""


@dataclass(frozen=True)
class Piece:
    """``numel`` consecutive values of the 1-D memory-mapped tensor ``flat``, from ``start``."""

    flat: torch.Tensor
    start: int
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of ``shape`` whose values are ``pieces`` laid end to end, stored as ``dtype``."""

    shape: torch.Size
    dtype: torch.dtype
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in ``dtype`` (floating point only; other tensors keep their own), in fresh memory."""
        if dtype is None or not self.dtype.is_floating_point:
            dtype = self.dtype
        out = torch.empty(self.numel, dtype=dtype)
        position = 0
        for piece in self.pieces:
            for offset in range(0, piece.numel, _CHUNK_NUMEL):
                count = min(_CHUNK_NUMEL, piece.numel - offset)
                source = piece.flat.narrow(0, piece.start + offset, count)
                out.narrow(0, position, count).copy_(source)  # copy_ casts without an fp32 temporary
                _release_pages(source)
                position += count
        return out.view(self.shape)


def _release_pages(tensor: torch.Tensor) -> None:
    """Let the kernel take back the pages under ``tensor``, a view into a memory-mapped checkpoint file."""
    if _LIBC is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    aligned = start - start % mmap.PAGESIZE
    _LIBC.madvise(aligned, start + tensor.numel() * tensor.element_size() - aligned, _MADV_PAGEOUT)


@dataclass(frozen=True)
class ZeroCheckpoint:
    """The weights of one ZeRO checkpoint (stage 0: a plain PyTorch one), by state-dict name; tied names map to the
    same LazyTensor."""

    tensors: dict[str, LazyTensor]
    zero_stage: int
    world_size: int


def read_zero_checkpoint(tag_dir: Path, trained_only: bool = False) -> ZeroCheckpoint:
    """Map the engine files in ``tag_dir`` (DeepSpeed's, or those of a run without it) and locate every parameter
    and buffer; reads no weights yet.

    ``trained_only``: the checkpoint holds only the trained parameters (saved with
    ``exclude_frozen_parameters``, as LoRA runs are).

    The files stay mapped while the returned LazyTensors live. Raises ZeroCheckpointError when files are
    missing, come from an unsupported layout (pipeline or tensor parallel, no ZeRO optimizer) or disagree.
    """
    tag_dir = Path(tag_dir)
    if (tag_dir / TORCH_MODEL_STATES).is_file():
        module = _load(tag_dir / TORCH_MODEL_STATES)["module"]
        return ZeroCheckpoint(tensors={name: _whole(t) for name, t in module.items()}, zero_stage=0, world_size=1)
    optim_states, stage = _optimizer_shards(tag_dir)
    if stage in (1, 2):
        tensors = _zero12_tensors(tag_dir, optim_states, trained_only)
    else:
        tensors = _zero3_tensors(tag_dir, optim_states, trained_only)
    return ZeroCheckpoint(tensors=tensors, zero_stage=stage, world_size=len(optim_states))


def _optimizer_shards(tag_dir: Path) -> tuple[list[dict], int]:
    """Every rank's optimizer state (mapped), in rank order, and the ZeRO stage (1, 2 or 3) that wrote them."""
    optim_files = _rank_files(tag_dir)
    optim_states = [_load(path)["optimizer_state_dict"] for path in optim_files]
    stage = int(optim_states[0].get("zero_stage", 0))
    partitions = optim_states[0].get("partition_count")
    partitions = max(partitions) if isinstance(partitions, list) else partitions
    if partitions != len(optim_files):
        raise ZeroCheckpointError(
            f"{tag_dir} holds {len(optim_files)} optimizer shards but they were written by {partitions} ranks"
        )
    if stage not in (1, 2, 3):
        raise ZeroCheckpointError(f"{optim_files[0]} has ZeRO stage {stage!r}; only stages 1, 2 and 3 are read")
    return optim_states, stage


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class OptimizerState:
    """What a ZeRO checkpoint's optimizer holds, by parameter name (each name the optimizer owns once; a tied alias
    is not repeated): ``tensors[name]`` maps ``"fp32"`` (the master weights) and each of ``ADAM_MOMENTS`` to a
    LazyTensor of the parameter's shape."""

    tensors: dict[str, dict[str, LazyTensor]]
    step: Any
    """The optimizer's step count as saved (AdamW: a 0-dim tensor), the same for every parameter."""
    zero_stage: int
    world_size: int
    rank0_state: dict
    """Rank 0's optimizer state as unpickled, mapped: the settings every rank shares (loss scaler, param groups)."""
    model_states: dict
    """The model-states file of rank 0 as unpickled, mapped: shapes, scheduler, counters."""


def read_optimizer_state(tag_dir: Path) -> OptimizerState:
    """Map the optimizer shards in ``tag_dir`` (ZeRO-1/2/3, one per rank) and locate the fp32 master and the Adam
    moments of every trained parameter; reads no values yet. Raises ZeroCheckpointError as `read_zero_checkpoint`
    does, and for an optimizer other than Adam(W)."""
    tag_dir = Path(tag_dir)
    optim_states, stage = _optimizer_shards(tag_dir)
    if stage in (1, 2):
        model_states = _load(tag_dir / ZERO12_MODEL_STATES)
        base = [state["base_optimizer_state"]["state"] for state in optim_states]
        masters, fp32 = _zero12_masters, "single_partition_of_fp32_groups"
    else:
        model_states = _load(tag_dir / zero3_model_states(0))
        base = [state["optimizer_state_dict"]["state"] for state in optim_states]
        masters, fp32 = _zero3_masters, "fp32_flat_groups"
    if not all(key in group for group in base[0].values() for key in ("step", *ADAM_MOMENTS)):
        raise ZeroCheckpointError(f"{tag_dir}: the optimizer state is not Adam's (step, exp_avg, exp_avg_sq)")
    found: dict[str, dict[str, LazyTensor]] = {}
    flats: dict[str, FlatOf] = {"fp32": lambda rank, group: optim_states[rank][fp32][group]}
    for key in ADAM_MOMENTS:
        flats[key] = lambda rank, group, key=key: base[rank][group][key]
    for key, flat_of in flats.items():
        for name, tensor in masters(tag_dir, model_states, optim_states, flat_of).items():
            found.setdefault(name, {})[key] = tensor
    return OptimizerState(found, base[0][0]["step"], stage, len(optim_states), optim_states[0], model_states)


def _rank_files(tag_dir: Path) -> list[Path]:
    if not tag_dir.is_dir():
        raise ZeroCheckpointError(f"no DeepSpeed tag folder at {tag_dir}")
    if any(tag_dir.glob("*mp_rank_0[1-9]*")) or any(tag_dir.glob("layer_*")):
        raise ZeroCheckpointError(f"{tag_dir} comes from a tensor- or pipeline-parallel run, which is not supported")
    ranks = {}
    for path in tag_dir.iterdir():
        match = ZERO_OPTIM_SHARD_RE.fullmatch(path.name)
        if match:
            rank = int(match.group(1))
            if rank in ranks:
                raise ZeroCheckpointError(f"{tag_dir} has two optimizer shards of rank {rank}")
            ranks[rank] = path
    if not ranks:
        raise ZeroCheckpointError(
            f"{tag_dir} has no ZeRO optimizer shards (zero_pp_rank_<r>_mp_rank_00_optim_states.pt)"
        )
    missing = sorted(set(range(max(ranks) + 1)) - ranks.keys())
    if missing:
        raise ZeroCheckpointError(f"{tag_dir} lacks the optimizer shards of ranks {missing}")
    return [ranks[r] for r in range(len(ranks))]


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ZeroCheckpointError(f"missing checkpoint file {path}")
    # mmap: unpickling builds the objects, the tensor data stays on disk until read. DeepSpeed pickles its
    # own classes (loss scaler, enums), hence weights_only=False: only load checkpoints you trust.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _whole(tensor: torch.Tensor) -> LazyTensor:
    return LazyTensor(tensor.shape, tensor.dtype, (Piece(tensor.reshape(-1), 0, tensor.numel()),))


FlatOf = Callable[[int, int], torch.Tensor]
"""(rank, param group) -> that rank's flat fp32 values of the group in its optimizer shard: the masters, or an Adam
moment."""


def _zero12_masters(
    tag_dir: Path, model_states: dict, optim_states: list[dict], flat_of: FlatOf
) -> dict[str, LazyTensor]:
    """Every parameter the optimizer owns, its pieces the `flat_of` slices that ``param_slice_mappings`` locate."""
    masters: dict[str, LazyTensor] = {}
    for group, shapes in enumerate(model_states["param_shapes"]):
        pieces: dict[str, list[Piece]] = {name: [] for name in shapes}
        for rank, state in enumerate(optim_states):
            if "param_slice_mappings" not in state:
                raise ZeroCheckpointError(
                    f"rank {rank}'s optimizer shard has no param_slice_mappings (written by an old DeepSpeed)"
                )
            flat = flat_of(rank, group)
            for name, address in state["param_slice_mappings"][group].items():
                if name not in pieces:
                    raise ZeroCheckpointError(f"rank {rank}'s optimizer shard holds {name}, which has no shape")
                pieces[name].append(Piece(flat, address.start, address.numel))
        for name, shape in shapes.items():
            tensor = LazyTensor(torch.Size(shape), torch.float32, tuple(pieces[name]))
            if sum(p.numel for p in tensor.pieces) != tensor.numel:
                raise ZeroCheckpointError(f"the optimizer shards in {tag_dir} do not cover {name} exactly")
            masters[name] = tensor
    return masters


def _zero12_tensors(tag_dir: Path, optim_states: list[dict], trained_only: bool) -> dict[str, LazyTensor]:
    model_states = _load(tag_dir / ZERO12_MODEL_STATES)
    masters = _zero12_masters(tag_dir, model_states, optim_states,
                              lambda rank, group: optim_states[rank]["single_partition_of_fp32_groups"][group])
    # The module has every other entry in full: buffers, frozen parameters, tied names (resolved below).
    module = model_states["module"]
    tensors = {name: masters[name] if name in masters else _whole(value) for name, value in module.items()}
    return _tie(tensors, model_states["shared_params"], trained_only)


def _zero3_masters(tag_dir: Path, first: dict, optim_states: list[dict], flat_of: FlatOf) -> dict[str, LazyTensor]:
    """Every parameter the optimizer owns: rank r's partition of each lies in its `flat_of` values, one parameter
    after another in ``param_shapes`` order (`_gather_partitions`)."""
    world_size, masters = len(optim_states), {}
    for group, shapes in enumerate(first["param_shapes"]):
        flats = [flat_of(rank, group) for rank in range(world_size)]
        offset = 0
        for name, shape in shapes.items():
            shape = torch.Size(shape)
            masters[name] = _gather_partitions(name, shape, [(flat, offset) for flat in flats])
            offset += math.ceil(shape.numel() / world_size)
        if offset != flats[0].numel():
            raise ZeroCheckpointError(
                f"param group {group} in {tag_dir}: the parameter shapes need {offset} values per rank, the "
                f"optimizer shards hold {flats[0].numel()}"
            )
    return masters


def _zero3_tensors(tag_dir: Path, optim_states: list[dict], trained_only: bool) -> dict[str, LazyTensor]:
    world_size = len(optim_states)
    model_states = [_load(tag_dir / zero3_model_states(r)) for r in range(world_size)]
    first = model_states[0]
    tensors: dict[str, LazyTensor] = {name: _whole(first["module"][name]) for name in first["buffer_names"]}
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        fragments = [state["frozen_param_fragments"][name] for state in model_states]
        tensors[name] = _gather_partitions(name, torch.Size(shape), [(f.reshape(-1), 0) for f in fragments])
    tensors.update(_zero3_masters(tag_dir, first, optim_states,
                                  lambda rank, group: optim_states[rank]["fp32_flat_groups"][group]))
    return _tie(tensors, first["shared_params"], trained_only)


def _gather_partitions(name: str, shape: torch.Size, partitions: list[tuple[torch.Tensor, int]]) -> LazyTensor:
    """A ZeRO-3 parameter from each rank's ``(flat, offset)``: rank r holds values [r*p, (r+1)*p) from
    ``offset``, with p = ceil(numel / ranks); the padding past numel (last ranks) is dropped."""
    numel = shape.numel()
    per_rank = math.ceil(numel / len(partitions))
    pieces = []
    for rank, (flat, offset) in enumerate(partitions):
        count = max(0, min(per_rank, numel - rank * per_rank))
        if offset + count > flat.numel():
            raise ZeroCheckpointError(
                f"rank {rank}'s partition of {name} is shorter than its shape {tuple(shape)} needs"
            )
        if count:
            pieces.append(Piece(flat, offset, count))
    return LazyTensor(shape, partitions[0][0].dtype, tuple(pieces))


def _tie(tensors: dict[str, LazyTensor], shared: dict[str, str], trained_only: bool) -> dict[str, LazyTensor]:
    """Point each tied name (``shared``: alias -> the name that holds the data) at its source.

    ``trained_only``: the checkpoint was saved without its frozen parameters (a LoRA run's base), so names
    tied to a frozen one have no source; they are left out with it.
    """
    for alias, source in shared.items():
        if source not in tensors and trained_only:
            continue
        if source not in tensors:
            raise ZeroCheckpointError(f"{alias} is tied to {source}, which the checkpoint does not hold")
        tensors[alias] = tensors[source]
    return tensors
