"""The wheel installs kernels/ as fastlm.kernels (never a top-level `kernels`) and ships csrc/
for the JIT build; building it needs no torch (setup.py imports torch only for the CUDA build)."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_BUILD_CUDA"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ROOT,
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    with zipfile.ZipFile(out / wheel) as zf:
        return zf.namelist()


def test_kernels_install_inside_the_package(wheel_names):
    assert "fastlm/kernels/layer_norm.py" in wheel_names
    assert "fastlm/kernels/__init__.py" in wheel_names
    assert not any(n.startswith("kernels/") for n in wheel_names)


def test_csrc_ships_for_the_jit_build(wheel_names):
    cu = [n for n in wheel_names if n.startswith("fastlm/csrc/") and n.endswith(".cu")]
    assert cu, "no CUDA sources in the wheel"


def test_no_tests_or_benchmarks_in_the_wheel(wheel_names):
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in wheel_names)


def test_plain_build_does_not_import_torch():
    code = "import sys, runpy; sys.argv=['setup.py','--name']; runpy.run_path('setup.py'); print('torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_BUILD_CUDA"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"
