"""Attention benchmark: fastlm (Triton, CUDA C++) vs F.scaled_dot_product_attention per backend.

Grids:
* FlashAttention grid: hidden 2048 (head_dim 64 x 32 heads, 128 x 16), seq 512..16384,
  batch = 16384 / seq, causal and not, fp16 and bf16; fwd, bwd and fwd+bwd.
* BERT/GPT-2 grid: head_dim 64 x 12 heads, seq 128..1024, batch 1/8/32 (BERT
  non-causal, GPT-2 causal), fp16; fwd and fwd+bwd.
* Padding: random lengths with mean 0.6 x max; fastlm padded (key_padding_mask) and
  varlen (packed) paths vs SDPA with a boolean mask where the backend accepts one.

TFLOP/s use 4 * B * S^2 * H * D for the forward (halved for causal), 2.5x that for the
backward (the FlashAttention convention); the padding grid counts the useful FLOPs (sum of len^2).
Baselines: SDPA flash, efficient, cudnn, math; torch.compile of the plain math; each
baseline that cannot run a shape (unsupported, OOM) is recorded as None.

fastlm-cuda rows (csrc/attention_fwd.cu forward; its backward is the Triton one) appear
wherever a trial call with backend="cuda" runs (the extension is built and the call is
within the kernel's limits: fp16/bf16, head_dim 64/128, aligned operands);
fastlm-padded-cuda / fastlm-varlen-cuda likewise.

``headline(res, device, timer, dry)``: the small fixed grid of benchmarks/gpu_check.sh
(no torch.compile, no SDPA math), on tiny shapes through the interpreter for its dry run.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    Results,
    fastlm_backends,
    line_plot,
    parse_args,
    require_gpu,
)
from benchmarks.harness import bench_or_none as _bench_or_none

SDPA = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}


def _sdpa(kind: str, causal: bool, mask: torch.Tensor | None = None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA[kind])

    def run(q, k, v):  # q, k, v: (B, S, H, D) views; SDPA wants (B, H, S, D)
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=causal and mask is None,
            )  # fmt: skip
        return out.transpose(1, 2)

    return run


def _naive(causal: bool):
    def run(q, k, v):
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
        if causal:
            n = q.shape[1]
            s = s.masked_fill(
                torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf")
            )
        return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)

    return run


def _fastlm(causal: bool, mask: torch.Tensor | None = None, backend: str = "triton"):
    import fastlm

    return lambda q, k, v: fastlm.attention(
        q, k, v, causal=causal, key_padding_mask=mask, backend=backend
    )


def _cuda_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether backend="cuda" runs this attention call here (a trial call)."""
    return "cuda" in fastlm_backends(lambda backend: _fastlm(causal, None, backend)(q, k, v))


def _time_passes(fn, q, k, v, passes, timer=None):
    """{pass: ms or None} for fwd, bwd (grad only, graph retained) and fwd+bwd; ``timer``
    replaces harness.bench (the dry run's run_once_ms)."""
    res = {}
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    bench_or_none = functools.partial(_bench_or_none, timer=timer)
    if "fwd" in passes:
        with torch.no_grad():
            res["fwd"] = bench_or_none(lambda: fn(*inputs))
    if "bwd" in passes or "fwd+bwd" in passes:
        try:
            out = fn(*inputs)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            print(f"  (skipped: {str(exc).splitlines()[0][:120]})")
            return {**res, "bwd": None, "fwd+bwd": None}
        dout = torch.randn_like(out)
        if "bwd" in passes:
            res["bwd"] = bench_or_none(
                lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)
            )
        del out
        if "fwd+bwd" in passes:
            res["fwd+bwd"] = bench_or_none(lambda: torch.autograd.grad(fn(*inputs), inputs, dout))
    return res


def _impls(causal: bool, mask=None, with_compile=True, cuda=False, sdpa=tuple(SDPA)):
    impls = {"fastlm-triton": _fastlm(causal, mask)}
    if cuda:
        impls["fastlm-cuda"] = _fastlm(causal, mask, "cuda")
    for kind in sdpa:
        impls[kind] = _sdpa(kind, causal, mask)
    if with_compile and mask is None:
        impls["compile-math"] = torch.compile(_naive(causal))
    return impls


def _record(res, grid, impl, dtype, shape, times, fwd_flops):
    scale = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    for p, ms in times.items():
        tflops = None if ms is None else fwd_flops * scale[p] / ms * 1e-9
        res.add(grid=grid, impl=impl, dtype=dtype, shape=shape, pass_=p, ms=ms, tflops=tflops)


def dense_shape(res, grid, b, s, h, d, causal, dtype, passes, *, device="cuda", timer=None,
                with_compile=True, sdpa=tuple(SDPA)) -> None:  # fmt: skip
    """Every implementation on one (B, S, H, D) shape: fastlm (triton, cuda where it serves)
    and the SDPA backends, each pass timed and recorded with its TFLOP/s."""
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
    flops = 4 * b * s * s * h * d / (2 if causal else 1)
    shape = dict(B=b, S=s, H=h, D=d, causal=causal)
    impls = _impls(causal, with_compile=with_compile, cuda=_cuda_serves(q, k, v, causal), sdpa=sdpa)
    for name, fn in impls.items():
        times = _time_passes(fn, q, k, v, passes, timer)
        _record(res, grid, name, dtype, shape, times, flops)


def flash_grid(res, quick: bool) -> None:
    seqs = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16]
    for dtype in dtypes:
        for d, h in ((64, 32), (128, 16)):
            for causal in (False, True):
                for s in seqs:
                    b = 16384 // s
                    print(f"flash grid {dtype} d={d} h={h} S={s} B={b} causal={causal}", flush=True)
                    dense_shape(res, "flash", b, s, h, d, causal, dtype, ("fwd", "bwd", "fwd+bwd"),
                                with_compile=not quick)  # fmt: skip
                    torch.cuda.empty_cache()


def model_grid(res, quick: bool) -> None:
    seqs = [128, 512] if quick else [128, 256, 512, 1024]
    for model, causal in (("bert", False), ("gpt2", True)):
        for s in seqs:
            for b in (1, 8, 32):
                print(f"{model} grid S={s} B={b}", flush=True)
                dense_shape(res, model, b, s, 12, 64, causal, torch.float16, ("fwd", "fwd+bwd"),
                            with_compile=not quick)  # fmt: skip


def padding_shape(res, b, s, h, d, *, device="cuda", timer=None, sdpa=tuple(SDPA), seed=0):
    """A batch with random lengths uniform in [0.2 S, S] (mean 0.6 x max, 40% padding):
    fastlm padded (key_padding_mask) and varlen (packed), against SDPA with a boolean mask."""
    import fastlm

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.2 * s), s + 1, (b,), generator=gen)
    mask = (torch.arange(s)[None, :] < lengths[:, None]).to(device)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.float16) for _ in range(3))
    flops = 4 * float((lengths.double() ** 2).sum()) * h * d
    shape = dict(B=b, S=s, H=h, D=d, mean_len=float(lengths.float().mean()))
    print(f"padding grid S={s} mean length {shape['mean_len']:.0f}", flush=True)
    passes = ("fwd", "fwd+bwd")
    for backend in fastlm_backends(lambda bk: _fastlm(False, mask, bk)(q, k, v)):
        times = _time_passes(_fastlm(False, mask, backend), q, k, v, passes, timer)
        name = "fastlm-padded" + ("" if backend == "triton" else "-cuda")
        _record(res, "padding", name, torch.float16, shape, times, flops)

    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cu = cu.to(device)
    qp, kp, vp = (t[mask] for t in (q, k, v))  # (total, H, D), packing outside the timing
    max_len = int(lengths.max())

    def varlen(q, k, v, backend="triton"):
        return fastlm.attention_varlen(q, k, v, cu, cu, max_len, max_len, backend=backend)

    for backend in fastlm_backends(lambda bk: varlen(qp, kp, vp, bk)):
        fn = functools.partial(varlen, backend=backend)
        times = _time_passes(fn, qp, kp, vp, passes, timer)
        name = "fastlm-varlen" + ("" if backend == "triton" else "-cuda")
        _record(res, "padding", name, torch.float16, shape, times, flops)

    sdpa_mask = mask[:, None, None, :]  # (B, 1, 1, S), True = attend
    for kind in sdpa:
        times = _time_passes(_sdpa(kind, False, sdpa_mask), q, k, v, passes, timer)
        _record(res, "padding", kind + "-masked", torch.float16, shape, times, flops)


def padding_grid(res, quick: bool) -> None:
    for s in [512] if quick else [128, 512, 1024]:
        padding_shape(res, 32, s, 12, 64)


HEADLINE_SDPA = ("sdpa-flash", "sdpa-cudnn")


def headline(res, device, timer=None, dry=False, budget=None) -> None:
    """The GPU check's attention rows: head_dim 128 at S 4096 and 8192 (16 heads, 16 K
    tokens), causal and not, fp16 and bf16; the BERT grid (12 x 64, S 128 and 512, batch
    32); a 40%-padded BERT batch, varlen against SDPA with a mask. fastlm vs SDPA flash and
    cuDNN (efficient too where a mask is given), fwd and fwd+bwd, no torch.compile. The dry
    run: tiny shapes (fp32, and the fp16 padding batch) through the interpreter. ``budget``
    (callable -> bool) is asked before each shape: False stops the grid."""
    more = budget or (lambda: True)
    passes = ("fwd", "fwd+bwd")
    low = torch.float32 if dry else torch.float16
    # (grid, B, S, H, D, causal, dtype); "padding": the 40%-padded batch (fp16, non-causal).
    if dry:
        shapes = [("flash", 2, 33, 2, 32, c, low) for c in (False, True)]
        shapes += [("bert", 2, 17, 2, 32, False, low), ("padding", 2, 17, 2, 32, False, None)]
    else:  # S 4096 first, then the cheap BERT rows, then S 8192: each kind gets measured
        shapes = [
            ("flash", 4, 4096, 16, 128, c, dt)
            for c in (False, True)
            for dt in (low, torch.bfloat16)
        ]
        shapes += [("bert", 32, 128, 12, 64, False, low), ("bert", 32, 512, 12, 64, False, low)]
        shapes += [("padding", 32, 512, 12, 64, False, None)]
        shapes += [
            ("flash", 2, 8192, 16, 128, c, dt)
            for c in (False, True)
            for dt in (low, torch.bfloat16)
        ]
    sdpa = ("sdpa-flash",) if dry else HEADLINE_SDPA
    for grid, b, s, h, d, causal, dtype in shapes:
        if not more():
            return
        print(f"attention {grid} hd{d} {dtype} S={s} B={b} causal={causal}", flush=True)
        if grid == "padding":
            padding_shape(
                res, b, s, h, d, device=device, timer=timer, sdpa=("sdpa-efficient", "sdpa-cudnn")
            )
        else:
            dense_shape(res, grid, b, s, h, d, causal, dtype, passes, device=device, timer=timer,
                        with_compile=False, sdpa=sdpa)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    require_gpu("bench_attention")
    args = parse_args("fastlm attention vs SDPA backends", argv)
    res = Results("attention", args.out)
    flash_grid(res, args.quick)
    model_grid(res, args.quick)
    padding_grid(res, args.quick)
    plot_rows = [
        r for r in res.rows
        if r["grid"] == "flash" and r["pass"] == "fwd" and r["dtype"] == "float16"
        and r["shape"]["D"] == 128 and not r["shape"]["causal"]
    ]  # fmt: skip
    res.save(
        plot=line_plot(
            plot_rows,
            x="S",
            y="tflops",
            series="impl",
            title="attention fwd, fp16, hd 128, non-causal",
        )
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
