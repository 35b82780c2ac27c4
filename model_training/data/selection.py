"""Choices every loader makes the same way: which languages a `lang` option names, which groups validate."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def parse_languages(lang: str) -> set[str]:
    """`"en, de,fr"` -> {"en", "de", "fr"}."""
    return {code.strip() for code in lang.split(",") if code.strip()}


def held_out_groups(group_ids: Iterable[str], val_split: float, seed: int) -> set[str]:
    """The groups (records, or whatever a caller keeps together) held out for validation by the sources that are
    not OASST: the ids sorted, shuffled by `seed`, and the first round(n * val_split) taken, so the split depends
    on the seed and the set of ids alone, not on file order."""
    ids = sorted(set(group_ids))
    random.Random(seed).shuffle(ids)
    return set(ids[: round(len(ids) * val_split)])


def split_like_openassistant(trees: Sequence[T], val_split: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation) trees, chosen as the OpenAssistant trainer's `load_oasst_export` chooses them:
    `torch.utils.data.random_split(trees, [1 - val_split, val_split])` with a `torch.Generator` seeded with
    `seed`. Each side's length is floor(n * fraction), the remainder going one by one to train first; the
    trees are drawn by position, so the result depends on the order of `trees`. Each side keeps that order
    (OpenAssistant's keeps the draw's), which changes nothing the trainer does with it: it shuffles anyway.

    `trees` must be what OpenAssistant's list holds: every tree that passes the tree filter, in file order,
    those that yield no thread included, since each one takes a place in the draw."""
    # Imported here: torch takes seconds to import, and the command line reads this module to report errors.
    import torch
    from torch.utils.data import random_split

    with warnings.catch_warnings():
        # torch warns when a side is empty, which val_split 0 asks for.
        warnings.filterwarnings("ignore", message="Length of split at index")
        _, val = random_split(range(len(trees)), [1.0 - val_split, val_split], torch.Generator().manual_seed(seed))
    held_out = set(val.indices)
    return [t for i, t in enumerate(trees) if i not in held_out], [t for i, t in enumerate(trees) if i in held_out]
