"""python -m fastlm info / check / bench / --version."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastlm
import fastlm.__main__ as cli
from fastlm import backends

ROOT = Path(__file__).resolve().parent.parent


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends on this device" in out
    for op in cli.OPS:
        assert op in out


def test_check_prints_a_pass_table(capsys):
    assert cli.main(["check", "layer_norm"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm" in out and "triton" in out and "pass" in out
    assert "FAIL" not in out and "ERROR" not in out
    assert re.search(r"^\d+ passed, 0 failed, \d+ skipped", out, flags=re.M), out


def test_check_names_each_skipped_row_and_counts_it(capsys, monkeypatch):
    # Without TRITON_INTERPRET the Triton rows cannot run on a CPU: the table must say so
    # and the summary must count them, never claim that everything passed.
    why = "TRITON_INTERPRET=1 is not set"
    real = backends.device_reason
    monkeypatch.setattr(
        backends, "device_reason", lambda b, dev: why if b == "triton" else real(b, dev)
    )
    assert cli.main(["check", "layer_norm"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^layer_norm\s+triton\s+-\s+skip\s+{why}$", out, flags=re.M), out
    assert "all checks passed" not in out
    passed, skipped = re.search(r"^(\d+) passed, 0 failed, (\d+) skipped", out, flags=re.M).groups()
    rows = [line.split() for line in out.splitlines() if line.startswith("layer_norm")]
    assert int(passed) == sum(r[3] == "pass" for r in rows) > 0
    assert int(skipped) == sum(r[3] == "skip" for r in rows) > 0


def test_version_names_fastlm_and_its_dependencies():
    proc = subprocess.run(
        [sys.executable, "-m", "fastlm", "--version"],
        cwd=ROOT,  # python -m finds this checkout's fastlm
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[:2] == ["fastlm", fastlm.__version__], proc.stdout
    for dependency in ("torch", "triton", "transformers"):
        assert dependency in words, proc.stdout


@pytest.mark.parametrize("command", [[], ["info"], ["check"], ["bench"], ["demo"]])
def test_help_is_plain_text(command, capsys):
    # argparse prints descriptions as they are: reStructuredText or Markdown markup in a
    # docstring would reach the terminal raw.
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fastlm")
    assert "`" not in out and not re.search(r":(mod|class|func|data):", out), out


def test_check_unknown_op(capsys):
    assert cli.main(["check", "softmax"]) == 2
    assert "unknown op" in capsys.readouterr().out


def test_bench_times_ops_against_pytorch(capsys):
    assert cli.main(["bench", "layer_norm", "--backend", "torch", "--min-run-time", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("layer_norm"))
    fastlm_ms, torch_ms, speedup = row.split()[1:]
    assert float(fastlm_ms) > 0 and float(torch_ms) > 0 and speedup.endswith("x")
    assert cli.main(["bench", "softmax"]) == 2


def test_installed_package_needs_no_repository_or_cycles(tmp_path):
    # Run from outside the repository, through the installed package (the repository's
    # benchmarks/ is not importable there): bench works from the package alone, and the check
    # table imports without its runner (the old selfcheck <-> selfcheck_ops loop).
    code = (
        "import sys, fastlm.selfcheck_ops\n"
        "assert 'fastlm.selfcheck' not in sys.modules\n"
        "import fastlm.__main__ as cli\n"
        "assert cli.main(['bench', 'layer_norm', '--backend', 'torch', '--min-run-time', '0.01']) == 0\n"
        "assert not any(m == 'benchmarks' or m.startswith('benchmarks.') for m in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
