"""Bias+GELU feed-forward: fastlm.linear_gelu and fastlm.gelu_ffn vs PyTorch.

Shapes: BERT-base (hidden 768, intermediate 3072, exact GELU), GPT-2 (768 -> 3072) and
GPT-2-medium (1024 -> 4096, tanh GELU), tokens M = 512..16384, fp16 and bf16, forward and forward+backward.

linear_gelu y = gelu(x W^T + b), x (M, K), W (N, K), against
  torch          F.gelu(F.linear(x, W, b)) eager (two kernels, h round-trips through memory)
  torch.compile  the same function compiled (inductor)
  cublas-gemm    F.linear(x, W, b) alone, no activation: the speed of light for the fused
                 kernel (target: within 5%, i.e. vs_gemm >= 0.95)
gelu_ffn out = gelu(x W1^T + b1) W2^T + b2 + x (BERT's residual), against the same in eager
PyTorch and torch.compile.

fastlm rows: fastlm-triton (GEMMs with fused epilogues) and, where the CUDA C++ extension
is available (a trial call with backend="cuda" runs), fastlm-cuda (cuBLAS
GEMMs + the csrc bias+GELU / GELU-backward / bias+residual epilogue kernels). Rows of both
on the same shape feed benchmarks/make_dispatch_table.py.

FLOPs: a GEMM is 2 M N K; linear_gelu forward 2 M N K, forward+backward 3x that (dx and dW
are one GEMM each); gelu_ffn forward 4 M H I, forward+backward 12 M H I. Elementwise work is
not counted. Ratios are against baselines measured in the same process.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    Results,
    bench_or_none,
    fastlm_backends,
    line_plot,
    parse_args,
    require_gpu,
)

MODELS = {
    "bert-base": (768, 3072, "none"),
    "gpt2": (768, 3072, "tanh"),
    "gpt2-medium": (1024, 4096, "tanh"),
}
TOKENS = [512, 1024, 2048, 4096, 8192, 16384]
DRY_MODELS = {"tiny": (64, 96, "none")}  # the CPU dry run: the interpreter pays per element


def fastlm_names(device) -> list[str]:
    """The fastlm backends benchmarked on ``device``: triton, plus cuda where it runs."""
    import fastlm

    x, w = torch.randn(2, 16, device=device), torch.randn(16, 16, device=device)
    return fastlm_backends(lambda backend: fastlm.linear_gelu(x, w, None, backend=backend))


def _linear_gelu_impls(fastlm_names, with_compile=True):
    import fastlm

    def eager(x, w, b, approximate):
        return F.gelu(F.linear(x, w, b), approximate=approximate)

    def fast(backend):
        return lambda x, w, b, a: fastlm.linear_gelu(x, w, b, approximate=a, backend=backend)

    return {
        **{f"fastlm-{name}": fast(name) for name in fastlm_names},
        "torch": eager,
        **({"torch.compile": torch.compile(eager)} if with_compile else {}),
        "cublas-gemm": lambda x, w, b, a: F.linear(x, w, b),
    }


def _gelu_ffn_impls(fastlm_names, with_compile=True):
    import fastlm

    def eager(x, w1, b1, w2, b2, approximate):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2) + x

    def fast(backend):
        def run(x, w1, b1, w2, b2, approximate):
            return fastlm.gelu_ffn(
                x, w1, b1, w2, b2, approximate=approximate, residual=x, backend=backend
            )

        return run

    return {
        **{f"fastlm-{name}": fast(name) for name in fastlm_names},
        "torch": eager,
        **({"torch.compile": torch.compile(eager)} if with_compile else {}),
    }


def _time_passes(fn, args, leaves, dy, timer):
    """(forward ms, forward+backward ms); None where the implementation cannot run."""
    fwd = timer(lambda: fn(*args))
    both = timer(lambda: torch.autograd.grad(fn(*args), leaves, dy))
    return fwd, both


def _record(res, op, model, impl, dtype, shape, times, flops, baselines):
    for pass_, ms in zip(("fwd", "fwd+bwd"), times):
        if ms is None:
            continue
        base = baselines.setdefault(pass_, {})
        base[impl] = ms
        torch_ms, gemm_ms = base.get("torch"), base.get("cublas-gemm")
        res.add(
            op=op, model=model, impl=impl, pass_=pass_, dtype=dtype, shape=shape, ms=ms,
            tflops=flops[pass_] / ms * 1e-9,
            vs_torch=torch_ms / ms if torch_ms else None,
            vs_gemm=gemm_ms / ms if gemm_ms and op == "linear_gelu" else None,
        )  # fmt: skip


def run(
    res: Results, device, tokens, models, dtypes, timer=bench_or_none, with_compile=True,
    ops=("linear_gelu", "gelu_ffn"),
) -> None:  # fmt: skip
    """All rows for the given sizes (device and timer are parameters so the script can be
    smoke-tested without a GPU)."""
    names = fastlm_names(device)
    fast_impls = [f"fastlm-{name}" for name in names]
    lg_impls = _linear_gelu_impls(names, with_compile)
    ffn_impls = _gelu_ffn_impls(names, with_compile)
    # One compiled graph per shape: keep torch.compile from falling back to eager after the
    # default recompile limit.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    for dtype in dtypes:
        for model in models:
            hidden, inter, approximate = {**MODELS, **DRY_MODELS}[model]
            w1 = (
                (torch.randn(inter, hidden, device=device) * hidden**-0.5)
                .to(dtype)
                .requires_grad_()
            )
            b1 = (0.1 * torch.randn(inter, device=device)).to(dtype).requires_grad_()
            w2 = (
                (torch.randn(hidden, inter, device=device) * inter**-0.5).to(dtype).requires_grad_()
            )
            b2 = (0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
            for m in tokens:
                x = torch.randn(m, hidden, device=device, dtype=dtype, requires_grad=True)
                print(f"{model} {str(dtype)[6:]} M={m}", flush=True)

                shape = {"M": m, "K": hidden, "N": inter}
                flops = {"fwd": 2 * m * hidden * inter, "fwd+bwd": 6 * m * hidden * inter}
                dy = torch.randn(m, inter, device=device, dtype=dtype)
                baselines: dict = {}
                for impl in [
                    i for i in ("cublas-gemm", "torch", "torch.compile") if i in lg_impls
                ] + fast_impls:
                    times = _time_passes(
                        lg_impls[impl], (x, w1, b1, approximate), (x, w1, b1), dy, timer
                    )
                    _record(res, "linear_gelu", model, impl, dtype, shape, times, flops, baselines)
                if "gelu_ffn" not in ops:
                    continue

                shape = {"M": m, "H": hidden, "I": inter}
                flops = {"fwd": 4 * m * hidden * inter, "fwd+bwd": 12 * m * hidden * inter}
                dy = torch.randn(m, hidden, device=device, dtype=dtype)
                baselines = {}
                for impl in [i for i in ("torch", "torch.compile") if i in ffn_impls] + fast_impls:
                    args = (x, w1, b1, w2, b2, approximate)
                    times = _time_passes(ffn_impls[impl], args, (x, w1, b1, w2, b2), dy, timer)
                    _record(res, "gelu_ffn", model, impl, dtype, shape, times, flops, baselines)


def headline(res: Results, device, timer=None, dry=False, budget=None) -> None:
    """The GPU check's rows: linear+GELU at BERT-base (768 -> 3072, erf) and GPT-2 (768 ->
    3072, tanh) for 4096 and 16384 tokens, fp16 and bf16, against cuBLAS alone and cuBLAS +
    torch GELU (no torch.compile); the dry run: 33 x 64 -> 96 in fp32 (interpreter)."""
    timer = functools.partial(bench_or_none, timer=timer)
    if dry:
        run(res, device, [33], ["tiny"], [torch.float32], timer, False, ("linear_gelu",))
    else:
        run(res, device, [4096, 16384], ["bert-base", "gpt2"], [torch.float16, torch.bfloat16],
            timer, False, ("linear_gelu",))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    require_gpu("bench_ffn")
    args = parse_args(__doc__, argv)
    res = Results("ffn", args.out)
    tokens = [512, 4096] if args.quick else TOKENS
    models = ["bert-base"] if args.quick else list(MODELS)
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    run(res, torch.device("cuda"), tokens, models, dtypes)
    rows = [
        r
        for r in res.rows
        if r["op"] == "linear_gelu"
        and r["model"] == "bert-base"
        and r["dtype"] == "float16"
        and r["pass"] == "fwd"
    ]
    res.save(
        plot=line_plot(
            rows, "M", "tflops", "impl", "linear_gelu forward, BERT-base 768->3072, fp16 (TFLOP/s)"
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
