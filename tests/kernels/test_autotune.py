"""kernels/_autotune.py and the prune hooks: FASTLM_AUTOTUNE=0, disk caching, spill pruning.

The interpreter gives every kernel a single config, so the autotuner never runs here; these
tests drive the launch path with a stand-in kernel and call the prune hooks on the GPU
config lists directly. Which configs spill on sm_90 was read off the sm_90 compile
(tests/kernels/test_sm90_compile.py, which also checks the kept ones there).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import triton

from fastlm.kernels import _autotune, attention_bwd, attention_common, attention_fwd, linear_gelu


class _Kernel:
    """An autotuned kernel's surface: configs, arg_names, early_config_prune, fn, [grid]."""

    def __init__(self, configs, prune=None):
        self.configs, self.arg_names, self.early_config_prune = configs, ["X", "n"], prune
        self.launched = []
        outer = self

        class _Fn:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: outer.launched.append(("fn", grid, args, kwargs))

        self.fn = _Fn()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(("autotuner", grid, args, kwargs))


def _cfg(m, warps=4):
    return triton.Config({"BLOCK_M": m}, num_warps=warps, num_stages=2)


def test_autotune_off_launches_the_first_kept_config_directly(monkeypatch):
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")
    seen = []

    def prune(configs, named_args, **kwargs):
        seen.append((named_args, kwargs))
        return configs[1:]  # the hook drops the first

    kernel = _Kernel([_cfg(128, 8), _cfg(64), _cfg(32)], prune)
    _autotune.launch(kernel, (3,), "x", 7, FLAG=True)
    [(path, grid, args, kwargs)] = kernel.launched
    assert path == "fn" and grid == (3,) and args == ("x", 7)
    assert kwargs["BLOCK_M"] == 64 and kwargs["num_warps"] == 4 and kwargs["FLAG"] is True
    assert seen == [({"X": "x", "n": 7}, {"FLAG": True})]


@pytest.mark.parametrize("value", [None, "1"])
def test_autotune_on_goes_through_the_autotuner(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("FASTLM_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("FASTLM_AUTOTUNE", value)
    kernel = _Kernel([_cfg(128), _cfg(64)])
    _autotune.launch(kernel, (1,), "x", 7)
    assert [entry[0] for entry in kernel.launched] == ["autotuner"]


def test_timings_are_cached_on_disk_where_triton_can(monkeypatch):
    captured = {}
    monkeypatch.setattr(_autotune.triton, "autotune", lambda **kw: captured.update(kw))
    _autotune.autotune([_cfg(64)], key=["n"], prune=lambda c, a, **k: c)
    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    assert captured.get("cache_results", False) is supported
    assert "early_config_prune" in captured["prune_configs_by"]


class _Q:
    def __init__(self, dtype):
        self.dtype = dtype


def _kept(kind, gpu_configs, dtype, head_dim, dropout=False):
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in gpu_configs
    ]
    block_d = attention_common.head_block(head_dim)
    kept = attention_common.pruner(kind)(
        configs, {"Q": _Q(dtype)}, BLOCK_D=block_d, HEAD_DIM=head_dim, HAS_DROPOUT=dropout
    )
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def test_attention_pruning_drops_the_configs_that_spill_on_sm90():
    fwd, dkdv = attention_fwd._GPU_CONFIGS, attention_bwd._DKDV_GPU_CONFIGS
    # fwd: 128x128 on eight warps spills at head_dim 64 (32 B) and 128 (160 B).
    for d in (64, 128):
        kept = _kept("fwd", fwd, torch.float16, d)
        assert (128, 128, 8, 3) not in kept and kept[0] == (128, 64, 8, 3), (d, kept)
    # dk/dv at head_dim 128: every config but 16x64 on eight warps spills.
    assert _kept("dkdv", dkdv, torch.float16, 128) == [(16, 64, 8, 2)]
    assert len(_kept("dkdv", dkdv, torch.float16, 64)) > 1
    # dq never spilled: nothing pruned.
    dq = attention_bwd._DQ_GPU_CONFIGS
    assert len(_kept("dq", dq, torch.bfloat16, 128)) == len(dq)
    # fp32 (FMA dots) spills everywhere: one config, the smallest.
    assert _kept("fwd", fwd, torch.float32, 64) == [(64, 32, 4, 3)]


def test_matmul_pruning_drops_the_128_register_accumulators(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # the GPU config list, not the interpreter's one
    configs = linear_gelu._configs()
    assert len(configs) > 1
    kept = linear_gelu._prune_by_registers(configs, {"A": _Q(torch.float16)})
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept]
    assert tiles and all(m * n // (32 * w) <= 64 for m, n, w in tiles), tiles
