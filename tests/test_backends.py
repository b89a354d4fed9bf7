"""fastlm.backends: the reasons a backend gives when it cannot run at all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

LATE_INTERPRETER = """
import os, torch
os.environ.pop("TRITON_INTERPRET", None)
import fastlm
import fastlm.kernels.layer_norm  # decorated for a GPU: the interpreter is off
os.environ["TRITON_INTERPRET"] = "1"  # ... and switched on too late
try:
    fastlm.layer_norm(torch.randn(2, 8), None, None, backend="triton")
except fastlm.BackendUnavailableError as exc:
    print("REASON:", exc)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a CPU machine")
def test_interpreter_switched_on_after_the_kernels_were_imported_names_the_cause():
    """Triton picks interpreter or compiler when a kernel is decorated: TRITON_INTERPRET=1
    set after fastlm's kernels were imported must get a clear reason, not Triton's error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", LATE_INTERPRETER], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REASON:" in out.stdout and "set after fastlm's Triton kernels were imported" in (
        out.stdout
    ), out.stdout


def test_forced_backend_names_its_reason_and_the_request_is_validated():
    import fastlm

    with pytest.raises(ValueError, match="unknown backend 'tritn'"):
        fastlm.layer_norm(torch.randn(2, 8), None, None, backend="tritn")
    with pytest.raises(TypeError, match="backend must be a string"):
        fastlm.layer_norm(torch.randn(2, 8), None, None, backend=3)
    assert "reference" in fastlm.available_backends("cpu")
