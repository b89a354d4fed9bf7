"""Test set-up: without a GPU, run the Triton kernels through the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

from tests.parity import KERNEL_DTYPES

# Property tests must not make CI flaky: by default Hypothesis runs derandomized (the same
# examples on every machine and every run) and keeps no example database, so a failure seen
# once in a clone cannot stick to every later run there. HYPOTHESIS_PROFILE=explore draws
# fresh random examples for local bug hunting; its seed is printed on failure.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The CPU thread governor (fastlm.cpu_threads) reacts to the machine's load, and the suite
# itself loads it (two workers on two cores): off, so no test's thread count depends on what
# ran beside it. tests/test_cpu_threads.py turns it on where it is the subject.
os.environ.setdefault("FASTLM_CPU_THREADS", "off")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_backend_decisions():
    """backends.choose remembers its decisions; tests that patch a backend's reason or the
    environment must not see (or leave) a decision taken under other conditions."""
    from fastlm import backends

    backends.forget_decisions()
    yield
    backends.forget_decisions()
