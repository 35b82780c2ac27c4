"""The keys of the token stores: each dataset is loaded, filtered and tokenized once, then read back.

`prepare_data` (prepare.py) keeps each dataset's token store (store.py) in a folder of `data_cache_dir` named by the
sha256 of everything its samples depend on (`TokenizedCache.key`):
- the input: a file's resolved path, size and mtime_ns (touching it is a change), every file of a `datasets`
  folder likewise, or a hub id with the revision the local hub cache holds for it;
- the dataset's typed options, less those only the sampler reads (`fraction`, `size`, `share`, `replace`);
- with `dedupe` on, the same for every dataset before it: dedupe crosses sources, so a dataset's samples
  depend on the whole prefix of the configured list (and so on its position in it);
- the global `max_length`, `val_max_length`, `chat_format`, `label_masking` and `dedupe`;
- the tokenizer: sha256 of its full JSON serialization (vocabulary, merges, added tokens, normalizer,
  pre-tokenizer) and of its special tokens and chat template;
- the source text of the modules that load records and turn them into samples (every source and the splits
  included), the store's layout, and the versions of transformers, tokenizers, datasets and torch (whose generator
  draws the OASST split), so that a change in how samples are built never reads an old store.

A store is written into a staging folder and renamed into place whole (build.py); every file is checked against the
size and hash its meta.json recorded when it is opened, and a store that does not match is a warning and is prepared
again. Nothing is evicted: the folder can be deleted at any time (not while a job prepares into it). With the cache
folder on a filesystem that every node sees, all the processes of a job, and a prepare command run ahead of it,
share one store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from model_training.config import TrainConfig
from model_training.data.sources.common import DatasetConfig

CACHE_FORMAT = 2
"""How keys are made and stores laid out (1: one .npz file per dataset; 2: a token store folder, store.py); part of
every key, so that a new layout never reads an old store."""
SAMPLING_ONLY_OPTIONS = ("fraction", "size", "share", "replace")
"""Dataset options that change what an epoch draws, not the samples: changing them keeps the cache entry."""
_SAMPLE_MODULES = ("build.py", "cache.py", "chat_formats.py", "encode.py", "formatting.py", "oasst.py", "records.py",
                   "prepare.py", "selection.py", "store.py")
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
        """The folder of the store under `key`."""
        return self.folder / key
