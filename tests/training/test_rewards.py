"""GRPO's reward functions (training/rewards.py): loading by dotted path, the shipped functions, and failures."""

from __future__ import annotations

import math

import pytest

from model_training.config import ConfigError
from model_training.training.rewards import (
    RewardError,
    exact_answer,
    format_match,
    length_penalty,
    load_reward_functions,
    reward_values,
)

SHIPPED = "model_training.training.rewards"


@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("The sum is 1,234.", 1234, 1.0),
    ("3 + 4 = 7.0", "7", 1.0),
    ("so -12", "#### -12", 1.0),
    ("first 7 then 8", 7, 0.0),
    ("no number", 7, 0.0),
    ("0.50", ".5", 1.0),
])
def test_exact_answer_compares_the_last_numbers(completion: str, answer: object, expected: float) -> None:
    assert exact_answer(completion=completion, answer=answer) == expected


def test_format_match_and_length_penalty() -> None:
    assert format_match(completion="Answer: 42", pattern=r"Answer: \d+") == 1.0
    assert format_match(completion="x Answer: 42", pattern=r"Answer: \d+", full=True) == 0.0
    assert length_penalty(completion="a" * 10, max_chars=10) == 0.0
    assert length_penalty(completion="a" * 15, max_chars=10) == -0.5
    assert length_penalty(completion="a" * 99, max_chars=10) == -1.0


def test_functions_load_by_path_with_weights_and_options() -> None:
    functions = load_reward_functions([
        {"function": f"{SHIPPED}:exact_answer", "weight": 2.0},
        {"function": f"{SHIPPED}:format_match", "options": {"pattern": "^[0-9]+$", "full": True}},
    ])
    assert [(f.path.split(":")[1], f.weight) for f in functions] == [("exact_answer", 2.0), ("format_match", 1.0)]
    values = reward_values(functions, ["1+1=", "2+2="], ["2", "four 5"], [{"answer": 2}, {"answer": 4}],
                           ["a.jsonl line 1", "a.jsonl line 2"])
    assert values == [[1.0, 0.0], [1.0, 0.0]]


@pytest.mark.parametrize(("entry", "message"), [
    ({"function": "no_colon"}, r"expected 'module:function'"),
    ({"function": "no_such_module_xyz:f"}, r"cannot import module 'no_such_module_xyz'"),
    ({"function": f"{SHIPPED}:missing"}, r"has no function 'missing'"),
    ({"function": f"{SHIPPED}:exact_answer", "wieght": 1}, r"unknown key 'wieght'"),
    ({"function": f"{SHIPPED}:exact_answer", "weight": math.nan}, r"expected a finite number"),
])
def test_a_bad_entry_is_a_config_error_naming_it(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"key 'grpo.reward_functions\[0\]'.*" + message):
        load_reward_functions([entry])


def test_a_failing_or_non_finite_function_names_itself_and_the_sample() -> None:
    (exact,) = load_reward_functions([{"function": f"{SHIPPED}:exact_answer"}])
    with pytest.raises(RewardError, match=r"exact_answer failed on p.jsonl line 2: ValueError: .*'answer' is 'none'"):
        reward_values([exact], ["a", "b"], ["1", "2"], [{"answer": 1}, {"answer": "none"}],
                      ["p.jsonl line 1", "p.jsonl line 2"])
    (penalty,) = load_reward_functions([{"function": "math:sqrt"}])
    with pytest.raises(RewardError, match="math:sqrt failed on s"):  # sqrt takes no keywords: it raises
        reward_values([penalty], ["a"], ["b"], [{}], ["s"])
    (nan,) = load_reward_functions([{"function": f"{__name__}:returns_nan"}])
    with pytest.raises(RewardError, match=r"returns_nan returned nan for s; expected a finite number"):
        reward_values([nan], ["a"], ["b"], [{}], ["s"])


def returns_nan(**_: object) -> float:
    return math.nan
