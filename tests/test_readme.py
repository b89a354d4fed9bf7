"""README.md stays true: every ```python block runs as written, and every `make` target and
`python -m fastlm` command it names exists.

Each python block runs in a fresh interpreter from an empty temporary directory, offline
(HF_HUB_OFFLINE=1), with this checkout first on PYTHONPATH so that the snippet imports the
fastlm under test (from a temporary directory `import fastlm` would otherwise find whichever
fastlm is installed). A block that cannot run on this machine is preceded by a line
``<!-- not run: <why> -->`` and is reported as skipped with that reason; keep those rare.
A block that imports a package this environment lacks (MiniLM's, on the GPU image) is
skipped naming it; `make test` installs every package the blocks import.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import fastlm.__main__ as cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->$")
MAX_NOT_RUN = 1
SNIPPET_TIMEOUT_S = 180  # each snippet takes well under 20 s; this only stops a hang


@dataclass(frozen=True)
class Block:
    lang: str  # the fence's info string: "python", "bash", "" (plain text)
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the reason of a `<!-- not run: ... -->` line right above the fence


def fenced_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start = i
        end = next(j for j in range(start + 1, len(lines)) if lines[j].startswith("```"))
        above = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
        marker = NOT_RUN.match(above)
        blocks.append(
            Block(
                lang=lines[start][3:].strip(),
                line=start + 1,
                code="\n".join(lines[start + 1 : end]) + "\n",
                not_run=marker.group(1) if marker else None,
            )
        )
        i = end + 1
    return blocks


TEXT = README.read_text()
BLOCKS = fenced_blocks(TEXT)
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def _shell_text() -> str:
    """What README.md gives as commands: its bash blocks and its inline code spans."""
    prose = re.sub(r"^```.*?^```", "", TEXT, flags=re.S | re.M)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]  # may wrap lines
    return "\n".join([b.code for b in BLOCKS if b.lang == "bash"] + spans)


def _missing_modules(code: str) -> list[str]:
    """The top-level modules ``code`` imports that this environment lacks (the GPU image has
    no MiniLM package, for one): such a block is skipped, naming them, instead of failing."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def test_readme_has_python_blocks():
    assert len(PYTHON) >= 4, [b.line for b in BLOCKS]


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: f"README.md:{b.line}")
def test_python_block_runs(block: Block, tmp_path):
    if block.not_run:
        pytest.skip(f"README.md line {block.line} is marked not run: {block.not_run}")
    if missing := _missing_modules(block.code):
        pytest.skip(f"README.md line {block.line} needs {', '.join(missing)}, not installed here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"README.md line {block.line}: the python block fails:\n{proc.stderr[-4000:]}"
    )


def test_not_run_markers_are_few_and_each_marks_a_python_block():
    markers = [n for n, s in enumerate(TEXT.splitlines(), 1) if NOT_RUN.match(s.strip())]
    marked = [b for b in PYTHON if b.not_run]
    assert len(markers) == len(marked), (
        f"not-run markers at README.md lines {markers}, but only the python blocks at "
        f"{[b.line for b in marked]} follow one"
    )
    assert len(marked) <= MAX_NOT_RUN, "python blocks not run: " + "; ".join(
        f"line {b.line} ({b.not_run})" for b in marked
    )


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


def test_make_targets_named_in_readme_exist():
    named = set(re.findall(r"\bmake\s+([A-Za-z][\w-]*)", _shell_text()))
    assert {"test", "demo", "test-compat"} <= named  # the parser still finds them
    assert named <= _makefile_targets(), sorted(named - _makefile_targets())


def test_fastlm_commands_named_in_readme_exist():
    named = set(re.findall(r"python -m fastlm\s+([-\w]+)", _shell_text()))
    assert {"check", "demo"} <= named
    known = set(cli.COMMANDS) | set(cli.build_parser()._option_string_actions)
    assert named <= known, sorted(named - known)


def test_tested_transformers_versions_match_the_pins():
    # The newest transformers `make test` may install is fastlm's own pin; `make test-compat`
    # pins the GPU image's versions in the Makefile.
    hf_extra = re.search(r"^hf = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    transformers_pin = re.search(r'"(transformers[^"]*)"', hf_extra.group(1)).group(1)
    assert f"`{transformers_pin}`" in TEXT
    compat_pins = re.search(r"^COMPAT_PINS \?=(.*)$", (ROOT / "Makefile").read_text(), re.M)
    for name, version in re.findall(r'"(\w+)==(\d+\.\d+)', compat_pins.group(1)):
        assert re.search(rf"{name} {re.escape(version)}\b", TEXT), f"{name} {version}"


def test_install_into_the_venv_goes_through_its_python():
    # `make` creates .venv --without-pip: there is no .venv/bin/pip to run.
    assert "--without-pip" in (ROOT / "Makefile").read_text()
    commands = _shell_text()
    assert ".venv/bin/python -m pip install" in commands
    assert not re.search(
        r"\.venv/bin/pip[ \t]+\w", commands
    )  # naming it is fine, running it is not
