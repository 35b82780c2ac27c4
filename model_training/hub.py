"""Whether a name in a config is a Hugging Face hub id or a local path.

Its own module because both the config (models, tokenizers) and the data sources (datasets) ask, and the config
imports the sources."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?")


def is_hub_id(name: str, root: Path) -> bool:
    """Whether `name` is a Hugging Face hub id (`name` or `owner/name`) rather than a path: it has that form and its
    first part is no file or folder in `root`, the folder relative paths start from (`data/tokenizr` is a typo in
    `data/`, never the hub user `data`)."""
    return bool(_HUB_ID.fullmatch(name)) and not (root / name.split("/")[0]).exists()
