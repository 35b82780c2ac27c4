"""The README's "Python API": each function is importable by the path and with the parameters it names."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def documented_functions() -> list[tuple[str, list[str]]]:
    """(dotted path, parameter names) of each `module.function(a, b=..., ...)` in the README's Python API."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    found = []
    for path, params in re.findall(r"`(model_training\.[\w.]+)\(([^)]*)\)`", section.replace("\n", " ")):
        names = [p.split("=")[0].strip() for p in params.split(",")]
        found.append((path, [n for n in names if n and n != "..."]))
    return found


def test_the_readme_documents_the_api() -> None:
    paths = [path for path, _ in documented_functions()]
    assert "model_training.data.oasst.load_oasst_export" in paths and len(paths) >= 4, paths


@pytest.mark.parametrize(("path", "params"), [pytest.param(*f, id=f[0]) for f in documented_functions()])
def test_a_documented_function_takes_the_documented_parameters(path: str, params: list[str]) -> None:
    module, _, name = path.rpartition(".")
    function = getattr(importlib.import_module(module), name)
    signature = inspect.signature(function).parameters
    assert list(signature)[: len(params)] == params, f"{path}{inspect.signature(function)}"


def test_a_renamed_module_keeps_its_documented_function_at_the_old_path() -> None:
    from model_training.data import prepare, registry

    assert registry.prepare_data is prepare.prepare_data
