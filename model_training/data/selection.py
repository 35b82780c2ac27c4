"""Choices every loader makes the same way: which languages a `lang` option names, which groups validate."""

from __future__ import annotations

import random
from collections.abc import Iterable


def parse_languages(lang: str) -> set[str]:
    """`"en, de,fr"` -> {"en", "de", "fr"}."""
    return {code.strip() for code in lang.split(",") if code.strip()}


def held_out_groups(group_ids: Iterable[str], val_split: float, seed: int) -> set[str]:
    """The groups (message trees, records) held out for validation: the ids sorted, shuffled by `seed`, and
    the first round(n * val_split) taken, so the split depends on the seed and the set of ids alone (not on
    file order), and an OASST tree falls on the same side whichever loader read it."""
    ids = sorted(set(group_ids))
    random.Random(seed).shuffle(ids)
    return set(ids[: round(len(ids) * val_split)])
