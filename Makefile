# fastlm entry points. `make test` and `make demo` work on a fresh machine: they create
# .venv (reusing a preinstalled torch through --system-site-packages), install fastlm
# editable and run. On a machine without a GPU the Triton kernels run through the Triton
# interpreter (TRITON_INTERPRET=1), so CI exercises the real kernels.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch 2.13 ships on these machines; an unpinned torch would pull
# gigabytes of CUDA packages, so pin it when torch is missing.
TORCH_PIN ?= torch==2.13.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(HAS_GPU),1)
  RUN_ENV :=
else
  RUN_ENV := TRITON_INTERPRET=1
endif
# Two workers: the interpreter is single-threaded Python and CI machines have 2 cores.
# worksteal: an idle worker takes queued tests from the busy one, so the few long tests
# (nvcc, the gpu_check dry run) do not leave one core idle at the end.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist worksteal
PYTEST_ARGS ?=

.PHONY: help venv test test-quick test-compat demo bench gpu-test check lint format clean

help:
	@echo "make test      set up .venv and run the test suite (Triton interpreter without a GPU)"
	@echo "make test-quick  the op/module/dispatch tests in fp32, stop at the first failure"
	@echo "make demo      MiniLM BERT and GPT-2 through fastlm vs Hugging Face"
	@echo "make bench     kernel and model benchmarks (needs a GPU)"
	@echo "make gpu-test  the test suite on a GPU, offline (reuses the installed torch/triton)"
	@echo "make test-compat  the suite on the GPU image's versions (triton 3.6, transformers 5.17)"
	@echo "make lint      ruff check and format check"

# --system-site-packages reaches the base interpreter's packages only; when $(PYTHON) is
# itself a venv (the GPU image's python3 is), a .pth file adds its site-packages too, so the
# preinstalled torch/triton/transformers are reused and nothing is downloaded.
# --without-pip: Ubuntu's python3 may lack ensurepip, which plain `venv` needs. pip is then
# the parent's (reached through those same site-packages) and installs into $(VENV) all the
# same; ensurepip is only a fallback for a parent without pip.
$(VENV)/.stamp-venv:
	$(PYTHON) -m venv --system-site-packages --without-pip $(VENV)
	$(PYTHON) -c "import site; print('\n'.join(site.getsitepackages()))" \
	  > "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_fastlm_parent_site.pth"
	$(VENV)/bin/python -m pip --version >/dev/null 2>&1 || $(VENV)/bin/python -m ensurepip -q \
	  || { echo "no pip for $(VENV): install pip for $(PYTHON)" >&2; exit 1; }
	@touch $@

# Full set-up with test extras (needs the package registry). pip byte-compiles what it
# installs on one core (about 50 s of a fresh set-up); --no-compile and one compileall over
# both cores afterwards write the same .pyc files in half the time. Compiled ahead because
# PYTHONDONTWRITEBYTECODE may be set, and then every process would recompile what it imports.
# Like pip's own pass, compileall's complaints about files that are not Python 3.11 (a
# package's templates or test data) do not fail the set-up.
SITE_PACKAGES = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
$(VENV)/.stamp-test: $(VENV)/.stamp-venv pyproject.toml setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-compile "setuptools>=64" wheel
	$(PY) -m pip install -q --no-compile --no-build-isolation -e ".[test,bench,dev]"
	$(PY) -m compileall -q -j 0 "$(SITE_PACKAGES)" >/dev/null || true
	@touch $@

# Offline set-up (GPU machines have no network): everything must already be installed.
$(VENV)/.stamp-offline: $(VENV)/.stamp-venv pyproject.toml setup.py
	$(PY) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	@touch $@

venv: $(VENV)/.stamp-test

test: $(VENV)/.stamp-test
	$(RUN_ENV) $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop while changing an op: every op, module and dispatch test in fp32 only,
# stopping at the first failure (about a quarter of `make test`). `make test` before landing.
QUICK_TESTS ?= tests/ops tests/nn tests/test_backends.py tests/csrc/test_dispatch.py
test-quick: $(VENV)/.stamp-test
	$(RUN_ENV) $(PY) -m pytest $(XDIST) -x -k "not float16 and not fp16" $(QUICK_TESTS) $(PYTEST_ARGS)

# The GPU image pins older versions than a fresh CPU install gets: run the suite against
# them too (interpreter), so API drift shows up before a GPU session. numpy < 2.3 because
# triton 3.6's interpreter converts 1-element arrays to scalars, which numpy 2.4 rejects.
COMPAT_VENV ?= .venv-compat
COMPAT_PINS ?= "triton==3.6.0" "transformers==5.17.0" "numpy<2.3"
$(COMPAT_VENV)/.stamp: $(VENV)/.stamp-test
	$(MAKE) PYTHON=$(abspath $(PY)) VENV=$(COMPAT_VENV) $(COMPAT_VENV)/.stamp-venv
	$(COMPAT_VENV)/bin/python -m pip install -q "setuptools>=64" wheel $(COMPAT_PINS)
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test-compat: $(COMPAT_VENV)/.stamp
	$(RUN_ENV) $(COMPAT_VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)

check: $(VENV)/.stamp-test
	$(RUN_ENV) $(PY) -m fastlm check

demo: $(VENV)/.stamp-test
	$(PY) -m fastlm demo

gpu-test: $(VENV)/.stamp-offline
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(if $(wildcard $(VENV)/.stamp-test),$(VENV)/.stamp-test,$(VENV)/.stamp-offline)
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache .ruff_cache
