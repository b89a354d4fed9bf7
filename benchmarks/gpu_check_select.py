"""pytest plugin: select the GPU check's tests from benchmarks/gpu_check_tests.txt.

    pytest -p benchmarks.gpu_check_select --select-file benchmarks/gpu_check_tests.txt \
        [--select-per-line N] [--select-report counts.json] <the files it names>

Each line of the file is ``<test file> [pytest -k expression]``; an item is kept when its
file matches a line and the line's expression (pytest's own -k grammar and matcher) accepts
it. ``--select-per-line N`` keeps only the first N items of each line (the CPU dry run).
The number each line selected goes to ``--select-report`` (JSON), and a line that selected
nothing is printed as an error: a renamed test file or keyword must fail the check loudly,
not shrink it silently. Under xdist every worker collects and filters identically.
"""

from __future__ import annotations

import json
import os

import pytest
from _pytest.mark import KeywordMatcher
from _pytest.mark.expression import Expression


def read_selection(path: str) -> list[tuple[str, str]]:
    """[(test file, -k expression or "")] from the selection file, comments skipped."""
    lines = []
    with open(path) as f:
        for raw in f:
            text = raw.split("#", 1)[0].strip()
            if text:
                file, _, expr = text.partition(" ")
                lines.append((file, expr.strip()))
    return lines


def pytest_addoption(parser):
    group = parser.getgroup("gpu-check selection")
    group.addoption("--select-file", help="selection file: '<test file> [-k expression]' lines")
    group.addoption("--select-per-line", type=int, default=0, help="keep the first N per line")
    group.addoption("--select-report", help="write {line: number selected} as JSON here")


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--select-file")
    if not path:
        return
    per_line = config.getoption("--select-per-line")
    root = str(config.rootpath)
    kept, counts = [], {}
    for file, expr in read_selection(path):
        match = Expression.compile(expr) if expr else None
        chosen = [
            item
            for item in items
            if os.path.relpath(str(item.path), root) == os.path.normpath(file)
            and (match is None or match.evaluate(KeywordMatcher.from_item(item)))
        ]
        counts[f"{file} {expr}".strip()] = len(chosen)
        if not chosen:
            print(f"\nERROR gpu-check selection collected no test: {file} -k {expr!r}")
        kept += [item for item in chosen[: per_line or None] if item not in kept]
    items[:] = kept
    report = config.getoption("--select-report")
    if report:
        with open(report, "w") as f:
            json.dump(counts, f, indent=1)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """An empty selection line fails the run even when every selected test passed."""
    report = session.config.getoption("--select-report")
    if report and os.path.exists(report) and exitstatus == 0:
        with open(report) as f:
            if not all(json.load(f).values()):
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
