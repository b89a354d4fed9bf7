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


# The few tests that take a minute or more (the GPU check's dry run, nvcc and g++ compile
# checks, whole-model torch.compile) run first. pytest-xdist's worksteal hands each worker
# half the collection and lets an idle worker take queued tests from the other, which it
# cannot do for one long test already running: collected last, such a test leaves the other
# core idle at the end of the run.
LONG_FIRST = (
    "tests/test_gpu_check.py",
    "tests/csrc/test_compile.py",
    "tests/csrc/test_binding_syntax.py",
    "tests/integrations/test_compile_hf.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
