"""The token store: one prepared dataset as flat arrays on disk, opened memory-mapped by every process that trains.

A store is a folder (named by its cache key, model_training/data/cache.py) holding

    ids.npy          every token id of the dataset's records, end to end: uint16 when the vocabulary fits, else int32
    mask.npy         uint8 per token: 1 where the token carries loss (its label is its id), 0 where it is ignored
    meta.json        written last: the counts of `--show_dataset_stats`, and each file's size and xxh3-128 hash

and the arrays that say which tokens make which sample, by stage. SFT (data/prepare.py):

    train_starts.npy, train_ends.npy   int64 per training sample: its token range [start, end) in ids.npy
    val_starts.npy, val_ends.npy       the same for the validation samples
    dedupe_keys.npy  uint8 (records, 16): the dedupe digests of the records the dataset kept, for later datasets

The preference stages (data/preferences.py): every formatted sequence is a range, and a group names its sequences:

    sequences_starts.npy, sequences_ends.npy   int64 per sequence (a conversation that ends in one ranked reply)
    train_members.npy, train_groups.npy        the sequences of every training group end to end, and where each
                                               group's begin (groups + 1 offsets); val_... the same

A label is always the token's id or IGNORE_INDEX (data/formatting.py writes nothing else), so the mask holds all
that the loss needs of the labels. Samples are token ranges, not copies: a text document's pieces are ranges of its
one token sequence, and a record dropped by dedupe or a length filter is simply in no range. No sample is stored
truncated: a conversation is cut when a batch is built (data/windows.py), so `FormattedSample.truncated` is False
for each one read here, as it was for each one prepared.

Every process opens the arrays with `mmap_mode="r"`: nothing per token lives on its heap, and the ranks of a node
share one copy in the page cache. A sample becomes a `FormattedSample` only when a batch asks for it. Opening checks
every file against meta.json (size and hash, reading the store once: that also brings it into the page cache); a
store that does not match is a warning and is prepared again (model_training/data/build.py).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import xxhash

from model_training.data.formatting import IGNORE_INDEX, FormattedSample

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
"""The layout above; part of every cache key (cache.py), so a new layout never reads an old store."""
META = "meta.json"
_HASH_CHUNK = 1 << 20


def token_dtype(vocabulary_size: int) -> np.dtype:
    """uint16 when every id fits (Falcon's 65,024 + 3 chat tokens do), else int32."""
    return np.dtype(np.uint16) if vocabulary_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def hash_file(path: Path) -> str:
    """xxh3-128 of a file, read in chunks (the page cache keeps what a later map reads)."""
    digest = xxhash.xxh3_128()
    # One buffer, read into again and again: a buffer a read allocates anew would be left on the heap (glibc keeps
    # large freed blocks once it has raised its mmap threshold), a megabyte or more held for the whole run.
    buffer = memoryview(bytearray(_HASH_CHUNK))
    with open(path, "rb") as f:
        while read := f.readinto(buffer):
            digest.update(buffer[:read])
    return digest.hexdigest()


def write_meta(folder: Path, key: str, counts: dict[str, Any]) -> None:
    """meta.json of a finished store folder: the key, `counts`, and every array file's size and hash (durably: the
    store counts as whole once this file exists)."""
    files = {p.name: {"size": p.stat().st_size, "xxh3_128": hash_file(p)} for p in sorted(folder.glob("*.npy"))}
    text = json.dumps({"format": STORE_FORMAT, "key": key, "counts": counts, "files": files}, indent=1)
    with open(folder / META, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


class StoreDamaged(ValueError):
    """A store folder that does not match its meta.json (a file cut short, altered or missing)."""


@dataclass(frozen=True)
class TokenStore:
    """An opened store: its arrays mapped read-only (`arrays`: every one but the tokens', by name), and the counts
    meta.json holds."""

    folder: Path
    ids: np.ndarray
    mask: np.ndarray
    arrays: dict[str, np.ndarray]
    counts: dict[str, Any]

    def samples(self, side: str) -> StoredSamples:
        """The samples of `side` ("train" or "val"), in the dataset's order."""
        return StoredSamples(self, self.arrays[f"{side}_starts"], self.arrays[f"{side}_ends"])


def open_store(folder: Path, key: str) -> TokenStore:
    """The store in `folder`, every file checked against meta.json; FileNotFoundError when there is no such folder,
    StoreDamaged when it holds no store that matches (stores are renamed into place whole: a folder without its
    meta.json was damaged after)."""
    if not folder.exists():
        raise FileNotFoundError(folder)
    if not (folder / META).exists():
        raise StoreDamaged(f"{META} is missing")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as err:
        raise StoreDamaged(f"{META} is unreadable ({err})") from None
    if meta.get("format") != STORE_FORMAT or meta.get("key") != key:
        raise StoreDamaged(f"{META} belongs to another key or layout")
    for name, expected in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise StoreDamaged(f"{name} is missing")
        if path.stat().st_size != expected["size"]:
            raise StoreDamaged(f"{name} has {path.stat().st_size} bytes, {META} says {expected['size']}")
        if hash_file(path) != expected["xxh3_128"]:
            raise StoreDamaged(f"{name} does not match the hash {META} recorded")

    try:
        arrays = {name.removesuffix(".npy"): np.load(folder / name, mmap_mode="r", allow_pickle=False)
                  for name in meta["files"]}
        store = TokenStore(folder, arrays.pop("ids"), arrays.pop("mask"), arrays, meta["counts"])
    except (OSError, ValueError, KeyError) as err:  # a file that hashes right but is no array: written by another
        raise StoreDamaged(f"an array does not load ({err})") from None
    for name, starts in arrays.items():
        if name.endswith("_starts"):
            ends = arrays.get(name.removesuffix("_starts") + "_ends")
            if ends is None or len(starts) != len(ends) or (
                    len(ends) and (ends.max() > len(store.ids) or (starts > ends).any())):
                raise StoreDamaged(f"the {name.removesuffix('_starts')} ranges do not fit the {len(store.ids)} tokens")
    return store


class StoredSamples(Sequence[FormattedSample]):
    """Samples of a store as a read-only sequence of `FormattedSample`s, each built when it is asked for."""

    def __init__(self, store: TokenStore, starts: np.ndarray, ends: np.ndarray) -> None:
        self.store = store
        self.starts = starts
        self.ends = ends

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> FormattedSample: ...

    @overload
    def __getitem__(self, index: slice) -> StoredSamples: ...

    def __getitem__(self, index: int | slice) -> FormattedSample | StoredSamples:
        if isinstance(index, slice):
            return StoredSamples(self.store, self.starts[index], self.ends[index])
        start, end = int(self.starts[index]), int(self.ends[index])
        ids = self.store.ids[start:end].astype(np.int64)
        labels = np.where(self.store.mask[start:end].astype(bool), ids, IGNORE_INDEX)
        return FormattedSample(tuple(ids.tolist()), tuple(labels.tolist()), truncated=False)

    @property
    def lengths(self) -> np.ndarray:
        """Each sample's number of tokens."""
        return (self.ends - self.starts).astype(np.int64)

    def supervised_in_first(self, limit: int) -> np.ndarray:
        """Each sample's supervised tokens among its first `limit` (what its cut to `limit` trains on)."""
        mask = self.store.mask
        return np.array([int(mask[a : min(b, a + limit)].sum()) for a, b in zip(self.starts.tolist(),
                                                                               self.ends.tolist())], dtype=np.int64)

    def update_digest(self, digest: Any) -> None:
        """What `FormattedSample.update_digest` feeds for each sample in turn, from the arrays."""
        ids_all, mask_all = self.store.ids, self.store.mask
        for start, end in zip(self.starts.tolist(), self.ends.tolist()):
            ids = ids_all[start:end].astype(np.int64)
            digest.update(ids.tobytes())
            digest.update(np.where(mask_all[start:end].astype(bool), ids, IGNORE_INDEX).tobytes())


class Concatenated(Sequence[Any]):
    """Several sequences of samples read as one (the run's pool of every dataset's training samples), none copied."""

    def __init__(self, parts: Sequence[Sequence[Any]]) -> None:
        self.parts = list(parts)
        self._offsets = np.cumsum([0, *(len(p) for p in self.parts)]).tolist()

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self._offsets, index) - 1
        return self.parts[part][index - self._offsets[part]]

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part


def update_digest(samples: Sequence[Any], digest: Any) -> None:
    """Feed every sample of `samples` (a store's, a list's, or a concatenation of them) to `digest`, in order, as each
    sample's own `update_digest` would."""
    for part in samples.parts if isinstance(samples, Concatenated) else [samples]:
        if isinstance(part, StoredSamples):
            part.update_digest(digest)
        else:
            for sample in part:
                sample.update_digest(digest)
