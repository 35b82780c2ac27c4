"""The error every user mistake in a config becomes, and the helpers its messages share.

A low module that imports nothing from the project, so that any module (the data sources, the config package, the
trainers) can raise `ConfigError` without an import cycle; `model_training.config` re-exports all three names.
"""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A mistake in a config file or on the command line; the message says what and where."""


def closest_name(name: str, candidates: list[str], n: int = 1) -> str:
    """'; did you mean 'x'?' for the candidate closest to a mistyped name ("'x', 'y' or 'z'" for up to `n` of
    them), or '' when none is close."""
    matches = [f"'{match}'" for match in difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)]
    if not matches:
        return ""
    listed = matches[0] if len(matches) == 1 else f"{', '.join(matches[:-1])} or {matches[-1]}"
    return f"; did you mean {listed}?"


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]
