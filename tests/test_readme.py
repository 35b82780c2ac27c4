"""The README as a newcomer reads it: every CPU command runs as written, and every link lands.

A fenced bash block right after a `<!-- cpu-check -->` comment is run, whole, by `bash -euo pipefail` in a scratch
copy of the repository (its tracked files), with the project's environment and a home folder of its own (so the
tokenized-data cache is the copy's); the `deepspeed` it finds takes a free port when the command names none.
`<!-- cpu-check: slow -->` marks a block that trains (seconds to a minute of DeepSpeed on 2 CPU ranks),
`<!-- cpu-check: heavy -->` one that takes minutes (every stage in a row): they carry the markers of the same name.
Blocks run in README order within one copy, so a later block finds what an earlier wrote (the own-data file), as it
does for the reader.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import DEEPSPEED, REPO, USER_HOME, cpu_env

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
CHECK = re.compile(r"<!-- cpu-check(?:: (slow|heavy))? -->\n```bash\n(.*?)\n```", re.DOTALL)


def cpu_blocks() -> list[tuple[str, str | None]]:
    """(the block's commands, its marker or None), in README order."""
    return [(code, marker or None) for marker, code in CHECK.findall(README.read_text(encoding="utf-8"))]


def test_the_readme_marks_its_cpu_commands() -> None:
    blocks = cpu_blocks()
    markers = re.findall(r"^<!-- cpu-check", README.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert len(blocks) == len(markers), "a marker before no bash block"
    commands = "\n".join(code for code, _ in blocks)
    for expected in ("--show_dataset_stats", "input_file_path", "scripts/rlhf_quickstart.sh", "trainer_dpo.py"):
        assert expected in commands


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tracked files of the repository, as a fresh clone has them."""
    root = tmp_path_factory.mktemp("clone")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "home").mkdir()
    return root


LAUNCHER = """#!/usr/bin/env bash
# The deepspeed launcher as the README names it, on a free port unless the command names one: a test never
# relies on the launcher's default port 29500, which another job on the machine may hold.
case " $* " in
    *" --master_port"*) exec "{deepspeed}" "$@" ;;
esac
exec "{deepspeed}" --master_port "$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); \
print(s.getsockname()[1])')" "$@"
"""


def run_block(code: str, root: Path, timeout: int) -> subprocess.CompletedProcess:
    env = cpu_env(HOME=str(root / "home"))
    launcher = root / "home" / "bin" / "deepspeed"
    if not launcher.exists():
        launcher.parent.mkdir(parents=True, exist_ok=True)
        launcher.write_text(LAUNCHER.format(deepspeed=DEEPSPEED))
        launcher.chmod(0o755)
    # The project's environment as activated (its python), behind the launcher above.
    env["PATH"] = os.pathsep.join([str(launcher.parent), str(Path(DEEPSPEED).parent), env["PATH"]])
    # The home folder is the copy's; DeepSpeed's CPU op, built once per machine, stays where it was built.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(USER_HOME / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = str(root)  # the copy's package, whichever checkout an editable install points at
    return subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def marked(marker: str | None) -> list[pytest.MarkDecorator]:
    return {None: [], "slow": [pytest.mark.slow], "heavy": [pytest.mark.slow, pytest.mark.heavy]}[marker]


@pytest.mark.parametrize(
    "index", [pytest.param(i, marks=marked(marker), id=f"block{i}-{marker or 'fast'}")
              for i, (_, marker) in enumerate(cpu_blocks())]
)
def test_a_readme_cpu_command_runs_as_written(index: int, scratch: Path) -> None:
    # The blocks before this one ran first when they were selected; the cheap ones always are, and run again here
    # (writing a file, printing statistics) so that this block finds what the reader's session has.
    blocks = cpu_blocks()
    for code, marker in blocks[:index]:
        if marker is None:
            assert run_block(code, scratch, 300).returncode == 0
    code, marker = blocks[index]
    result = run_block(code, scratch, {None: 300, "slow": 900, "heavy": 1800}[marker])
    assert result.returncode == 0, f"{code}\n--- exit status {result.returncode}; output tail:\n{result.stdout[-6000:]}"
    assert "Traceback" not in result.stdout, result.stdout[-6000:]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, code marks and punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_link_lands_on_a_file_and_heading(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, fragment = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} names no file"
        if fragment:
            assert fragment in anchors(path), f"{page.name}: {link} names no heading of {path.name}"


def test_the_contents_list_every_section_in_order() -> None:
    text = README.read_text(encoding="utf-8")
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"\]\(#([^)]+)\)", contents)
    sections = [anchor(h) for h in re.findall(r"^## (.+)$", re.sub(r"```.*?```", "", text, flags=re.DOTALL),
                                                flags=re.MULTILINE)]
    assert [s for s in sections if s != "contents"] == [s for s in listed if s in sections]
    assert sections[1:5] == ["quick-start", "your-data-in-three-steps", "training", "export"]


def test_docs_are_named_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    assert DOCS and all(f"docs/{page.name}" in text for page in DOCS)
