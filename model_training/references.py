"""Functions named in text as 'module:function': GRPO's reward functions in a config, the behaviours of a stage
(stages.py). The module is imported when the function is first asked for, so a table of names imports nothing."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from model_training.errors import ConfigError


def resolve_function(path: str, where: str) -> Callable[..., Any]:
    """The function `path` ('module:function') names; ConfigError, prefixed with `where` (the config key that gave
    it), when it has another form, its module does not import or has no such function."""
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"{where}: function is '{path}'; expected 'module:function', e.g. "
                          "'model_training.training.rewards:exact_answer'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{where}: cannot import module '{module_name}' of '{path}': {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{where}: module '{module_name}' has no function '{name}'")
    return function
