"""A disk cache of tokenized datasets: each dataset is loaded, filtered and tokenized once, then read back.

`prepare_data` (registry.py) asks, per dataset, for a file named by the sha256 of everything its samples
depend on (`TokenizedCache.key`):
- the input: a file's resolved path, size and mtime_ns (touching it is a change), every file of a `datasets`
  folder likewise, or a hub id with the revision the local hub cache holds for it;
- the dataset's typed options, less those only the sampler reads (`fraction`, `size`, `share`, `replace`);
- with `dedupe` on, the same for every dataset before it: dedupe crosses sources, so a dataset's samples
  depend on the whole prefix of the configured list (and so on its position in it);
- the global `max_length`, `chat_format` and `dedupe`;
- the tokenizer: sha256 of its full JSON serialization (vocabulary, merges, added tokens, normalizer,
  pre-tokenizer) and of its special tokens and chat template;
- the source text of the modules that load records and turn them into samples (every source and the splits
  included) and the versions of transformers, tokenizers, datasets and torch (whose generator draws the OASST
  split), so that a change in how samples are built never reads an old entry.

A file is an uncompressed numpy `.npz` of plain integer arrays (per split: the concatenated ids and labels,
offsets, truncation flags, counts; the filter counts; the dedupe digests the dataset added), read with
`allow_pickle=False`: loading never runs code from the file. Files are written to a temporary name in the
same folder and renamed into place (`os.replace`), so a reader sees a whole file or none. On a miss every
rank computes and writes the same file itself, as all ranks did before the cache: no rank waits on another
and data preparation needs no process group (`--show_dataset_stats` has none); the last rename wins with
identical content. An unreadable file (truncated, not an archive, another layout) is a warning and a miss,
and is overwritten. Nothing is evicted: the folder can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from model_training.config import TrainConfig
from model_training.data.formatting import FormattedSample
from model_training.data.sources.common import DatasetConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_FORMAT = 1
"""Layout of the cache files; part of every key, so a new layout never reads an old file."""
SAMPLING_ONLY_OPTIONS = ("fraction", "size", "share", "replace")
"""Dataset options that change what an epoch draws, not the samples: changing them keeps the cache entry."""
_SAMPLE_MODULES = ("cache.py", "chat_formats.py", "formatting.py", "oasst.py", "records.py", "registry.py",
                   "selection.py")
# Every module of the sources package too (the loads and the splits), added ones included.
_SOURCES_PACKAGE = "sources"
# torch: the OASST split is drawn by its random generator.
_LIBRARIES = ("transformers", "tokenizers", "datasets", "torch")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides the ids: the tokenizer's JSON serialization (a slow tokenizer: its vocabulary),
    its special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(state.encode())
    extra = [type(tokenizer).__name__, tokenizer.chat_template, sorted(tokenizer.special_tokens_map.items())]
    digest.update(json.dumps(extra, default=str).encode())
    return digest.hexdigest()


def _code_fingerprint() -> str:
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    sources = sorted(str(path.relative_to(here)) for path in (here / _SOURCES_PACKAGE).glob("*.py"))
    for name in [*_SAMPLE_MODULES, *sources]:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()


def _library_versions() -> dict[str, str | None]:
    # importlib.metadata, not `import datasets`: importing it takes seconds that a cache hit should save.
    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_identity(source: str) -> dict[str, Any] | None:
    """What identifies a dataset's input: a file's path, size and mtime_ns; each file of a folder likewise;
    otherwise (a hub id) the id and the revision the local hub cache holds; None when nothing identifies it
    (a hub id not downloaded yet), and then the dataset is not cached."""
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {
            "folder": str(path.resolve()),
            "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    revision = _hub_revision(source)
    if revision is None:
        return None  # nothing identifies what the hub will serve: not cacheable
    return {"hub": source, "revision": revision}


def _hub_revision(repo_id: str) -> str | None:
    """The commit the hub cache's `main` ref of dataset `repo_id` points at (None before the first download).
    The `datasets` library updates that ref when it finds a newer revision online, which changes the key."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip()
    except OSError:
        return None


def describe_dataset(name: str, options: DatasetConfig, source: str) -> dict[str, Any]:
    """One dataset's part of a cache key: its name, its input's identity and its sample-shaping options."""
    shaping = {k: v for k, v in asdict(options).items() if k not in SAMPLING_ONLY_OPTIONS}
    return {"name": name, "source": source_identity(source), "options": shaping}


def samples_to_arrays(prefix: str, samples: list[FormattedSample]) -> dict[str, np.ndarray]:
    """Samples as flat arrays: ids and labels concatenated (int32), offsets into them, truncation flags."""
    lengths = [len(s.input_ids) for s in samples]
    return {
        f"{prefix}_ids": np.fromiter((t for s in samples for t in s.input_ids), np.int32, sum(lengths)),
        f"{prefix}_labels": np.fromiter((t for s in samples for t in s.labels), np.int32, sum(lengths)),
        f"{prefix}_offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        f"{prefix}_truncated": np.array([s.truncated for s in samples], dtype=bool),
    }


def arrays_to_samples(prefix: str, arrays: dict[str, np.ndarray]) -> list[FormattedSample]:
    """The inverse of `samples_to_arrays`; ValueError when the arrays do not fit together."""
    ids, labels = arrays[f"{prefix}_ids"].tolist(), arrays[f"{prefix}_labels"].tolist()
    offsets, truncated = arrays[f"{prefix}_offsets"].tolist(), arrays[f"{prefix}_truncated"].tolist()
    if (
        len(offsets) != len(truncated) + 1
        or offsets[0] != 0
        or offsets[-1] != len(ids)
        or len(labels) != len(ids)
        or any(b < a for a, b in zip(offsets, offsets[1:]))
    ):
        raise ValueError(f"the {prefix} arrays do not fit together")
    return [
        FormattedSample(tuple(ids[a:b]), tuple(labels[a:b]), bool(cut))
        for a, b, cut in zip(offsets, offsets[1:], truncated)
    ]


class TokenizedCache:
    """The cache folder and the key parts every dataset of one config shares."""

    def __init__(self, folder: Path, cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.folder = folder
        self._shared = {
            "format": CACHE_FORMAT,
            "code": _code_fingerprint(),
            "libraries": _library_versions(),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": cfg.max_length,
            "val_max_length": cfg.val_max_length,
            "chat_format": cfg.chat_format,
            "label_masking": cfg.label_masking,
            "dedupe": cfg.dedupe,
        }

    @classmethod
    def for_config(cls, cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> TokenizedCache | None:
        """The cache `cfg.data_cache_dir` names, or None when it is null (caching off)."""
        if cfg.data_cache_dir is None:
            return None
        return cls(Path(cfg.data_cache_dir).expanduser(), cfg, tokenizer)

    def key(self, datasets: list[dict[str, Any]]) -> str:
        """The key of the last of `datasets` (each from `describe_dataset`), given those before it."""
        text = json.dumps({**self._shared, "datasets": datasets}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def load(self, key: str, decode: Callable[[dict[str, np.ndarray]], T]) -> T | None:
        """`decode` of the arrays stored under `key`; None when there is no file or it cannot be read."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            if str(arrays.pop("key")) != key:
                raise ValueError("the file belongs to another key")
            return decode(arrays)
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, recomputing fixes it
            logger.warning("tokenized cache file %s is unreadable (%s: %s); recomputing it", path,
                           type(err).__name__, err)
            return None

    def store(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Write the arrays under `key`, atomically; a failure (read-only folder, full disk) is a warning."""
        path = self.path(key)
        temporary = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key[:16]}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.array(key), **arrays)
            os.chmod(temporary, 0o644)  # mkstemp makes it private; a cache folder may be shared
            os.replace(temporary, path)
        except OSError as err:
            logger.warning("could not write the tokenized cache file %s (%s); training goes on without it", path, err)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
