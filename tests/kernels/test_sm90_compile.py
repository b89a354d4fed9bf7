"""Every Triton kernel compiles for the H100 (sm_90) with every GPU autotune config.

The launches are the real ones the ops make (recorded under the interpreter on small
inputs); Triton's GPU compiler then builds each for sm_90 in a subprocess, no GPU needed.
Catches what the interpreter cannot: tl.dot layout/dtype rules, bf16 code paths, shared
memory and register spills of the autotune configs the prune hooks keep, and 16-bit dots
that miss Hopper's wgmma path. Launches
are compiled with the JIT's own specializations (16-byte alignment, divisibility by 16,
ints equal to 1 as constants), which decide vectorization and software pipelining. Every config once per kernel; the first kept config for
the other dtype and flag variants.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import fastlm
from tests.kernels.sm90_compile import H100_MAX_SMEM, compile_launches, record, unique

triton = pytest.importorskip("triton")
_NVIDIA = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(_NVIDIA), reason="triton's bundled ptxas is missing"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real"),
]


def _layer_norm(dtype):
    for n in (768, 16384):
        x = torch.randn(3, n, dtype=dtype, requires_grad=True)
        w = torch.randn(n, dtype=dtype, requires_grad=True)
        y, z = fastlm.layer_norm(x, w, w, residual=x, backend="triton")
        (y.float().sum() + z.float().sum()).backward()
    fastlm.layer_norm(torch.randn(2, 384, dtype=dtype), None, None, backend="triton")


def _ffn(dtype):
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    w1 = torch.randn(96, 64, dtype=dtype, requires_grad=True)
    b1 = torch.randn(96, dtype=dtype, requires_grad=True)
    w2 = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    for approx in ("none", "tanh"):
        fastlm.linear_gelu(x, w1, b1, approximate=approx, backend="triton").float().sum().backward()
        out = fastlm.gelu_ffn(
            x, w1, b1, w2, b1[:64], approximate=approx, residual=x, backend="triton"
        )
        out.float().sum().backward()


def _attention(dtype):
    # fp16 walks every head dim and flag; bf16/fp32 only need their dtype paths compiled.
    head_dims = (64, 128, 80) if dtype == torch.float16 else (64,)
    for d in head_dims:
        q = torch.randn(2, 17, 4, d, dtype=dtype, requires_grad=True)
        kv = torch.randn(2, 17, 2, d, dtype=dtype, requires_grad=True)
        mask = torch.ones(2, 17, dtype=torch.bool)
        mask[1, 9:] = False
        out = fastlm.attention(q, kv, kv, causal=True, key_padding_mask=mask, backend="triton")
        out.float().sum().backward()
    if dtype != torch.float16:
        return
    q = torch.randn(1, 17, 2, 64, dtype=dtype, requires_grad=True)
    fastlm.attention(q, q, q, dropout_p=0.1, backend="triton").float().sum().backward()
    p = torch.randn(20, 2, 64, dtype=dtype, requires_grad=True)
    cu = torch.tensor([0, 3, 20], dtype=torch.int32)
    fastlm.attention_varlen(
        p, p, p, cu, cu, 17, 17, causal=True, backend="triton"
    ).float().sum().backward()


def _decode(dtype):
    for d, h, hkv in ((64, 4, 4), (128, 8, 2)):
        q = torch.randn(2, 1, h, d, dtype=dtype)
        cache = torch.randn(2, 40, hkv, d, dtype=dtype)
        new = torch.randn(2, 1, hkv, d, dtype=dtype)
        seqlens = torch.tensor([5, 30], dtype=torch.int32)
        fastlm.attention_with_kvcache(
            q, cache, cache.clone(), seqlens, k=new, v=new, backend="triton"
        )


WORKLOADS = {"layer_norm": _layer_norm, "ffn": _ffn, "attention": _attention, "decode": _decode}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_kernels_compile_for_sm90(workload):
    launches, swept = [], set()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for launch in unique(record(lambda dtype=dtype: WORKLOADS[workload](dtype))):
            # Every autotune config once per kernel (its first fp16 launch); the first kept
            # config for the other variants: enough to cover each code path, CI-sized.
            launch["all_configs"] = dtype == torch.float16 and launch["kernel"] not in swept
            swept.add(launch["kernel"])
            launches.append(launch)
    assert launches, "the workload launched no Triton kernel"
    results = compile_launches(unique(launches))

    failed = [r for r in results if not r["ok"] and "OutOfResources" not in r["error"]]
    assert not failed, "\n\n".join(
        f"{r['kernel']} [{r['config']}] {r['signature']}\n{r['tb']}" for r in failed
    )
    # A config the prune hook keeps must fit an H100 block's shared memory: the autotuner
    # would otherwise spend a compile on it at every new key and drop it.
    too_big = [r for r in results if r["kept"] and (not r["ok"] or r["shared"] > H100_MAX_SMEM)]
    assert not too_big, [
        (r["kernel"], r["config"], r["signature"].get("Q"), r.get("shared")) for r in too_big
    ]
    # And every launch keeps at least one config.
    for launch_sig in {
        json.dumps([r["kernel"], r["signature"], _variant(r)], sort_keys=True) for r in results
    }:
        kernel, sig, variant = json.loads(launch_sig)
        mine = [
            r
            for r in results
            if r["kernel"] == kernel and r["signature"] == sig and _variant(r) == variant
        ]
        assert any(r["ok"] and r["kept"] and r["shared"] <= H100_MAX_SMEM for r in mine), (
            kernel,
            sig,
            variant,
        )

    # A kept 16-bit autotune config must not spill registers to local memory (the prune
    # hooks' register estimates, kernels/attention_common.pruner and linear_gelu's, drop
    # those). fp32 is exempt: its true-fp32 dots run on FMA units and spill at every tile
    # shape; its prune keeps the smallest config. Kernels launched with one fixed config
    # ("launch") have no choice to prune.
    spilling = [
        (r["kernel"], r["config"], r["constexprs"].get("HEAD_DIM"), r["spill_bytes"])
        for r in results
        if r["kept"] and r["ok"] and r["config"] != "launch" and _is_16bit(r)
        and r.get("spill_bytes")
    ]  # fmt: skip
    assert not spilling, f"kept configs spill (kernel, config, head_dim, bytes): {spilling}"

    # 16-bit dots run on Hopper's warpgroup MMA (wgmma), not the older mma.sync path.
    for k in DOT_KERNELS & {r["kernel"] for r in results}:
        half = [r for r in results if r["kernel"] == k and r["ok"] and _is_16bit(r)]
        assert not half or all(r["wgmma"] for r in half), (
            k,
            [r["config"] for r in half if not r["wgmma"]],
        )


DOT_KERNELS = {"_fused_matmul_kernel", "_attn_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}


def _is_16bit(result: dict) -> bool:
    return any(t in ("*fp16", "*bf16") for t in result["signature"].values())


_TUNED = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def _variant(result: dict) -> dict:
    """The launch's constexprs without the autotuned ones: one variant of the kernel."""
    return {k: v for k, v in result["constexprs"].items() if k not in _TUNED}
