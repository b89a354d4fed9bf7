"""Autotuning policy shared by the Triton launchers.

* ``autotune(configs, key, prune)``: ``triton.autotune`` with the configs pruned by the
  caller's hook and, where the installed triton has ``cache_results`` (3.2+), the timings
  cached on disk, so a second process with the same shapes does not benchmark again.
* ``FASTLM_AUTOTUNE=0``: ``launch`` skips the benchmarking entirely and runs the first
  config the prune hook keeps for this call: one heuristic config per shape class (dtype,
  head dim, flags), compiled once, never timed. This is what a short GPU window wants (the
  test suite would otherwise time every config at every new key: 25-45 minutes).
* ``regs_per_thread``: the estimate the prune hooks use to drop configs that would spill
  registers (the sm_90 compile check, tests/kernels/test_sm90_compile.py, checks it).
"""

from __future__ import annotations

import inspect
import os

import triton

from fastlm.kernels import _mode  # noqa: F401  (records the Triton mode before any kernel)

AUTOTUNE_ENV = "FASTLM_AUTOTUNE"
MAX_REGS = 255  # registers per thread on sm_80/sm_90; more spill to local memory


def autotune_enabled() -> bool:
    """False when FASTLM_AUTOTUNE is 0/false/no/off: one heuristic config, no benchmarking."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def autotune(configs: list, key: list[str], prune=None):
    """triton.autotune over ``configs`` with ``prune`` as early_config_prune, caching the
    timings across processes where this triton supports it."""
    kwargs = {}
    if prune is not None:
        kwargs["prune_configs_by"] = {"early_config_prune": prune}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **kwargs)


def heuristic_config(kernel, args: tuple, kwargs: dict):
    """The config FASTLM_AUTOTUNE=0 runs: the first one the kernel's prune hook keeps for
    these arguments (the config lists are ordered best-first for large shapes)."""
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        return kernel.configs[0]
    return prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)[0]


def _config_kwargs(config) -> dict:
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for an autotuned kernel; with FASTLM_AUTOTUNE=0 the
    heuristic config is launched directly on the underlying JIT function (no timing on any
    triton version, and the grid still sees the config's block sizes)."""
    if autotune_enabled() or len(kernel.configs) == 1:
        return kernel[grid](*args, **kwargs)
    config = _config_kwargs(heuristic_config(kernel, args, kwargs))
    return kernel.fn[grid](*args, **kwargs, **config)


def regs_per_thread(acc_elems: int, operand_elems: int, num_warps: int, elt_bytes: int) -> float:
    """Registers one thread holds for a tile program: fp32 accumulators (one register each)
    plus the dot operands resident in registers (a 32-bit register holds 4 / elt_bytes of
    them), spread over the program's 32 * num_warps threads. An estimate, not the
    compiler's count: addresses, masks and softmax statistics come on top."""
    threads = 32 * num_warps
    return (acc_elems + operand_elems * elt_bytes / 4) / threads
