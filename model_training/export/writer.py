"""Safetensors weight files laid out like transformers' ``save_pretrained``, written one shard at a time.

One shard: ``model.safetensors``. Several: ``model-00001-of-0000N.safetensors`` ... and
``model.safetensors.index.json`` mapping each tensor name to its file. A shard's tensors are materialized
just before it is written and dropped after, so at most one shard is in memory. As in transformers, the
size limit counts tensor bytes, and a tensor larger than the limit gets a shard of its own.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Decimal units as Hugging Face reads them ("2GB" is 2 * 10**9 bytes), binary ones for those who want them.
_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


class DiskFullError(OSError):
    """ENOSPC while writing the weights, with the bytes all of them need."""

    def __init__(self, needed: int) -> None:
        super().__init__(errno.ENOSPC, "No space left on device")
        self.needed = needed


def parse_size(text: str) -> int:
    """Bytes in ``text``: a plain number of bytes or a number with a unit ("500MB", "1.5GB", "2GiB")."""
    if text.strip().startswith("-"):
        raise ValueError(f"the size {text!r} is negative; expected a positive size such as 2GB")
    match = _SIZE_RE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a size: give bytes or a number with KB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    size = int(Decimal(match.group(1)) * _UNITS[unit])  # Decimal: "1.1KB" is 1100 bytes, not 1100.0000001
    if size < 1:
        raise ValueError(f"the size {text!r} is less than one byte")
    return size


@dataclass(frozen=True)
class WeightEntry:
    """One tensor to write: its name, its size in the file, and how to produce it."""

    name: str
    nbytes: int
    load: Callable[[], torch.Tensor]


def plan_shards(entries: list[WeightEntry], max_shard_size: int) -> list[list[WeightEntry]]:
    """Split ``entries``, kept in order, into shards of at most ``max_shard_size`` tensor bytes each."""
    shards: list[list[WeightEntry]] = []
    size = 0
    for entry in entries:
        if not shards or size + entry.nbytes > max_shard_size:
            if entry.nbytes > max_shard_size:
                logger.warning("%s (%d bytes) is larger than the shard size: it gets a shard alone", entry.name,
                               entry.nbytes)
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_weights(folder: Path, entries: list[WeightEntry], max_shard_size: int, index_metadata: dict) -> list[str]:
    """Write ``entries`` into ``folder`` as shards (plus the index when there are several); return the
    shard file names. ``index_metadata`` joins ``total_size`` in the index's metadata."""
    if not entries:
        raise ValueError("no weights to write")
    shards = plan_shards(entries, max_shard_size)
    names = shard_file_names(len(shards))
    umask = os.umask(0)
    os.umask(umask)
    file_mode = 0o666 & ~umask
    for number, (file_name, shard) in enumerate(zip(names, shards), start=1):
        tensors = {entry.name: entry.load() for entry in shard}
        try:
            save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        except Exception as err:  # safetensors' own SafetensorError carries the OS's message, not its errno
            if "No space left on device" in str(err):
                raise DiskFullError(sum(entry.nbytes for entry in entries)) from err
            raise
        os.chmod(folder / file_name, file_mode)  # safetensors creates 0600 files; share them like the rest
        del tensors  # before the next shard is built: one shard in memory at a time
        logger.info("wrote %s (%d/%d, %d tensors)", file_name, number, len(shards), len(shard))
    if len(shards) > 1:
        index = {
            "metadata": {**index_metadata, "total_size": sum(entry.nbytes for entry in entries)},
            "weight_map": {entry.name: name for name, shard in zip(names, shards) for entry in shard},
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
