"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check runs here, on the CPU.

A GPU window is short and rare; the script must not rot between windows. The dry run goes
through the same stages (environment without pip, the test selection, models, benchmarks,
packing) with tiny shapes through the Triton interpreter, and this test checks what a GPU
window would bring back: at most 8 plain, well-named files with summary.md and
results.json, every stage reported and passed, and every line of the test selection
collecting tests (a renamed test file or keyword fails here, not on the GPU).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks.gpu_check_select import read_selection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["probe", "correctness", "models", "bench"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--dry-run"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    return out, proc


def test_dry_run_passes(dry_run):
    _, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_out_holds_few_plain_well_named_files(dry_run):
    out, _ = dry_run
    names = sorted(os.listdir(out))
    assert {"summary.md", "results.json"} <= set(names), names
    assert len(names) <= 8, names
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
        assert os.path.isfile(out / name) and not os.path.islink(out / name), name


def test_every_stage_reported_and_passed(dry_run):
    out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == STAGES
    assert all(s["status"] == "passed" for s in results["stages"]), results["stages"]
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | passed |" in summary, stage
    assert results["models"] and all(m["status"] != "failed" for m in results["models"])
    sections = results["bench_sections"]
    assert sections and all(s["status"] == "passed" for s in sections), sections
    assert results["bench"], "no benchmark row"
    assert results["environment"]["dry_run"] is True


def test_every_selection_line_collects_tests(dry_run):
    out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    selection = results["correctness"]["selection"]
    lines = read_selection(os.path.join(REPO, "benchmarks", "gpu_check_tests.txt"))
    assert len(selection) == len(lines)
    assert all(n > 0 for n in selection.values()), selection
    # The dry run runs the first test of every line, and each finished.
    assert len(results["correctness"]["tests"]) == len(lines)
    assert not [t for t in results["correctness"]["tests"] if t["outcome"] in ("FAILED", "ERROR")]


def test_a_selection_line_that_collects_nothing_fails(tmp_path):
    """A renamed test or keyword must fail the check loudly, not shrink it silently."""
    select = tmp_path / "select.txt"
    select.write_text("tests/test_gpu_long.py  long\ntests/test_gpu_long.py  no_such_test\n")
    report = tmp_path / "counts.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_check_select", "-p", "no:cacheprovider",
         "--select-file", str(select), "--select-report", str(report), "--collect-only", "-q",
         "tests/test_gpu_long.py"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    counts = json.loads(report.read_text())
    assert counts == {"tests/test_gpu_long.py long": 8, "tests/test_gpu_long.py no_such_test": 0}
    assert proc.returncode != 0
    assert "collected no test" in proc.stdout


def test_the_compute_sanitizer_test_stays_out_of_the_selection():
    """compute-sanitizer runs for minutes: the quick path must never select it."""
    from _pytest.mark.expression import Expression

    name = "test_compute_sanitizer_memcheck"
    for file, expr in read_selection(os.path.join(REPO, "benchmarks", "gpu_check_tests.txt")):
        with open(os.path.join(REPO, file)) as f:
            if name not in f.read():
                continue
        words = [name, os.path.basename(file)]
        matches = lambda ident, words=words, **_: any(ident.lower() in w.lower() for w in words)
        assert expr and not Expression.compile(expr).evaluate(matches), (file, expr)
