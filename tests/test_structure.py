"""The package stays readable in one sitting: no function longer than a screen."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "model_training"
MAX_LINES = 60


def test_no_function_in_the_package_is_longer_than_60_lines() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, "split these: " + "; ".join(too_long)


def _imports(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in it (a function's deferred imports too), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("model_training"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("model_training"))
    return found


def _package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def test_training_and_export_never_import_each_other_and_checkpoints_imports_neither() -> None:
    climbs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        forbidden = {"training": ("export",), "export": ("training",), "checkpoints": ("training", "export")}
        for other in forbidden.get(_package_of(path), ()):
            climbs += [f"{path.relative_to(PACKAGE.parent)} imports {name}" for name in sorted(_imports(path))
                       if name.startswith(f"model_training.{other}")]
    assert not climbs, climbs


def test_only_the_table_of_stages_tells_stages_apart_by_name() -> None:
    """Every difference between stages is a field of its row in stages.py (whose own code compares no name either)."""
    comparison = re.compile(r"\bstage\s*(==|!=|in\s*\(|not in\s*\()\s*[\"'(]")
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if comparison.search(line)]
    assert not found, found


def test_module_level_imports_of_the_package_form_no_cycle() -> None:
    """Deferred imports inside functions aside (each says why), module A importing B importing A is a cycle."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        imported = set()
        for node in tree.body:  # module level only; `if TYPE_CHECKING:` blocks are not run
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("model_training"):
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done:
            return
        for child in sorted(graph[name]):
            visit(child, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
