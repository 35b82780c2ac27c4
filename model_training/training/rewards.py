"""Reward functions for GRPO: plain Python, named in the config by a dotted path `module:function`.

A reward function is called once per continuation, `fn(prompt=..., completion=..., **fields, **options) -> float`:
`prompt` and `completion` are decoded text (the prompt as the chat format shows it to the model), `fields` are the
prompt record's other fields (e.g. `answer`), and `options` the function's own keyword arguments from the config
(`grpo.reward_functions: [{function: "mypkg.rewards:correct", weight: 1.0, options: {...}}]`). A function should
accept `**_` for the fields it does not read. A continuation's reward is the weighted sum of the functions' values
(and of the reward model's score, `grpo.reward_model_weight`).

A function that raises or returns something that is not a finite number stops the step before any update, with one
line that names the function and the sample (`RewardError`): a reward that is wrong for one sample is a bug to fix,
not a value to train on.

Shipped functions (use them by these paths):
- `model_training.training.rewards:exact_answer`: 1.0 when the last number in the completion equals the record's
  `answer` (its last number too, so "#### 72" works), numbers compared after removing thousands separators and
  trailing zeros; else 0.0.
- `model_training.training.rewards:format_match`: 1.0 when the completion matches `pattern` (re.search, or
  re.fullmatch with `full: true`); else 0.0.
- `model_training.training.rewards:length_penalty`: 0.0 up to `max_chars` characters, then minus the excess as a
  fraction of `max_chars`, down to -1.0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from model_training.config import ConfigError
from model_training.references import resolve_function

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class RewardError(RuntimeError):
    """A reward function failed or returned a non-finite value for a sample."""


@dataclass(frozen=True)
class RewardFunction:
    """A configured reward function."""

    path: str
    """Its dotted path, as configured: the name in metrics and messages."""
    weight: float
    options: Mapping[str, Any]
    call: Callable[..., Any]


def load_reward_functions(entries: Sequence[Any], key: str = "grpo.reward_functions") -> list[RewardFunction]:
    """The functions of `entries` ({function, weight, options} each); ConfigError naming the entry when a path does
    not import or is not callable."""
    functions = []
    for index, entry in enumerate(entries):
        where = f"key '{key}[{index}]'"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("function"), str):
            raise ConfigError(f"{where} is {entry!r}; expected {{function: 'module:function', weight: 1.0, "
                              "options: {...}}")
        unknown = sorted(set(entry) - {"function", "weight", "options"})
        if unknown:
            raise ConfigError(f"{where} has unknown key '{unknown[0]}'; the keys are function, weight, options")
        path, weight, options = entry["function"], entry.get("weight", 1.0), entry.get("options") or {}
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ConfigError(f"{where}: weight is {weight!r}; expected a finite number")
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}: options is {options!r}; expected a mapping of keyword arguments")
        functions.append(RewardFunction(path, float(weight), dict(options), resolve_function(path, where)))
    return functions


def reward_values(
    functions: Sequence[RewardFunction], prompts: Sequence[str], completions: Sequence[str],
    fields: Sequence[Mapping[str, Any]], sources: Sequence[str],
) -> list[list[float]]:
    """Each function's values, unweighted: one row per function, one column per continuation. RewardError names the
    function and the sample (`sources[i]`) when a call raises or returns a non-finite value."""
    table = []
    for function in functions:
        row = []
        for prompt, completion, extra, source in zip(prompts, completions, fields, sources, strict=True):
            try:
                value = function.call(prompt=prompt, completion=completion, **extra, **function.options)
                number = float(value)
            except Exception as err:  # noqa: BLE001 - user code: any failure is reported as one line
                raise RewardError(f"reward function {function.path} failed on {source}: "
                                  f"{type(err).__name__}: {err}") from None
            if isinstance(value, bool) or not math.isfinite(number):
                raise RewardError(f"reward function {function.path} returned {value!r} for {source}; expected a "
                                  "finite number")
            row.append(number)
        table.append(row)
    return table


def _last_number(text: str) -> Decimal | None:
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", "")).normalize()
    except InvalidOperation:
        return None


def exact_answer(completion: str, answer: Any = None, **_: Any) -> float:
    """1.0 when the completion's last number equals the answer's (module docstring); else 0.0."""
    expected = _last_number(answer) if answer is not None else None
    if expected is None:
        raise ValueError(f"the record's 'answer' is {answer!r}, which holds no number")
    return 1.0 if _last_number(completion) == expected else 0.0


def format_match(completion: str, pattern: str = "", full: bool = False, **_: Any) -> float:
    """1.0 when the completion matches `pattern`; else 0.0."""
    if not pattern:
        raise ValueError("format_match needs options: {pattern: '...'}")
    found = re.fullmatch(pattern, completion, re.DOTALL) if full else re.search(pattern, completion)
    return 1.0 if found else 0.0


def length_penalty(completion: str, max_chars: int = 0, **_: Any) -> float:
    """0.0 up to `max_chars` characters, then -(excess / max_chars), down to -1.0."""
    if max_chars <= 0:
        raise ValueError(f"length_penalty needs options: {{max_chars: N}} with N > 0, not {max_chars!r}")
    return -min(1.0, max(0, len(completion) - max_chars) / max_chars)
