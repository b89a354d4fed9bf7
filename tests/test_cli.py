"""python -m fastlm info / check / bench."""

import os
import subprocess
import sys

import fastlm.__main__ as cli


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
    assert "all checks passed" in out


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
