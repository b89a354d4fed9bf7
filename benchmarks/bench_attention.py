"""Attention benchmark: fastlm (Triton, CUDA C++) vs F.scaled_dot_product_attention per backend.

Grids:
* FlashAttention grid: hidden 2048 (head_dim 64 x 32 heads, 128 x 16), seq 512..16384,
  batch = 16384 / seq, causal and not, fp16 and bf16; fwd, bwd and fwd+bwd.
* BERT/GPT-2 grid: head_dim 64 x 12 heads, seq 128..1024, batch 1/8/32 (BERT
  non-causal, GPT-2 causal), fp16; fwd and fwd+bwd.
* Padding: random lengths with mean 0.6 x max; fastlm padded (key_padding_mask) and
  varlen (packed) paths vs SDPA with a boolean mask where the backend accepts one.

TFLOP/s use 4 * B * S^2 * H * D for the forward (halved for causal), 2.5x that for the
backward (DESIGN.md); the padding grid counts the useful FLOPs (sum of len^2).
Baselines: SDPA flash, efficient, cudnn, math; torch.compile of the plain math; each
baseline that cannot run a shape (unsupported, OOM) is recorded as None.

fastlm-cuda rows (csrc/attention_fwd.cu forward; its backward is the Triton one) appear
wherever fastlm.backends.device_reason("cuda", device) is None (the extension loaded) and
the call is within the kernel's limits (fastlm.ops.attention.cuda_reason: fp16/bf16,
head_dim 64/128, aligned operands); fastlm-padded-cuda / fastlm-varlen-cuda likewise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.harness import Results, bench_or_none, line_plot, parse_args, require_gpu

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


def _cuda_serves(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> bool:
    """Whether backend="cuda" can run this call (extension loaded, within its limits)."""
    from fastlm.backends import device_reason
    from fastlm.ops.attention import cuda_reason

    reason = device_reason("cuda", q.device) or cuda_reason(op, q, k, v, batch, 0.0)
    return reason is None


def _fastlm_backends(op: str, q, k, v, batch: int) -> list[str]:
    return ["triton", *(["cuda"] if _cuda_serves(op, q, k, v, batch) else [])]


def _time_passes(fn, q, k, v, passes):
    """{pass: ms or None} for fwd, bwd (grad only, graph retained) and fwd+bwd."""
    res = {}
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
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


def _impls(causal: bool, mask=None, with_compile=True, cuda=False):
    impls = {"fastlm-triton": _fastlm(causal, mask)}
    if cuda:
        impls["fastlm-cuda"] = _fastlm(causal, mask, "cuda")
    for kind in SDPA:
        impls[kind] = _sdpa(kind, causal, mask)
    if with_compile and mask is None:
        impls["compile-math"] = torch.compile(_naive(causal))
    return impls


def _record(res, grid, impl, dtype, shape, times, fwd_flops):
    scale = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    for p, ms in times.items():
        tflops = None if ms is None else fwd_flops * scale[p] / ms * 1e-9
        res.add(grid=grid, impl=impl, dtype=dtype, shape=shape, pass_=p, ms=ms, tflops=tflops)


def flash_grid(res, quick: bool) -> None:
    seqs = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16]
    for dtype in dtypes:
        for d, h in ((64, 32), (128, 16)):
            for causal in (False, True):
                for s in seqs:
                    b = 16384 // s
                    print(f"flash grid {dtype} d={d} h={h} S={s} B={b} causal={causal}", flush=True)
                    q, k, v = (
                        torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3)
                    )
                    flops = 4 * b * s * s * h * d / (2 if causal else 1)
                    shape = dict(B=b, S=s, H=h, D=d, causal=causal)
                    cuda = _cuda_serves("attention", q, k, v, b)
                    for name, fn in _impls(causal, with_compile=not quick, cuda=cuda).items():
                        times = _time_passes(fn, q, k, v, ("fwd", "bwd", "fwd+bwd"))
                        _record(res, "flash", name, dtype, shape, times, flops)
                    del q, k, v
                    torch.cuda.empty_cache()


def model_grid(res, quick: bool) -> None:
    seqs = [128, 512] if quick else [128, 256, 512, 1024]
    for model, causal in (("bert", False), ("gpt2", True)):
        for s in seqs:
            for b in (1, 8, 32):
                print(f"{model} grid S={s} B={b}", flush=True)
                q, k, v = (
                    torch.randn(b, s, 12, 64, device="cuda", dtype=torch.float16) for _ in range(3)
                )
                flops = 4 * b * s * s * 12 * 64 / (2 if causal else 1)
                shape = dict(B=b, S=s, H=12, D=64, causal=causal)
                cuda = _cuda_serves("attention", q, k, v, b)
                for name, fn in _impls(causal, with_compile=not quick, cuda=cuda).items():
                    times = _time_passes(fn, q, k, v, ("fwd", "fwd+bwd"))
                    _record(res, model, name, torch.float16, shape, times, flops)


def padding_grid(res, quick: bool) -> None:
    import fastlm

    seqs = [512] if quick else [128, 512, 1024]
    gen = torch.Generator().manual_seed(0)
    for s in seqs:
        b, h, d = 32, 12, 64
        # Lengths uniform in [0.2 S, S]: mean 0.6 x max.
        lengths = torch.randint(int(0.2 * s), s + 1, (b,), generator=gen)
        mask = (torch.arange(s)[None, :] < lengths[:, None]).cuda()
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = 4 * float((lengths.double() ** 2).sum()) * h * d
        shape = dict(B=b, S=s, H=h, D=d, mean_len=float(lengths.float().mean()))
        print(f"padding grid S={s} mean length {shape['mean_len']:.0f}", flush=True)
        for backend in _fastlm_backends("attention", q, k, v, b):
            times = _time_passes(_fastlm(False, mask, backend), q, k, v, ("fwd", "fwd+bwd"))
            name = "fastlm-padded" + ("" if backend == "triton" else "-cuda")
            _record(res, "padding", name, torch.float16, shape, times, flops)

        cu = torch.zeros(b + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        cu = cu.cuda()
        qp, kp, vp = (t[mask] for t in (q, k, v))  # (total, H, D), packing outside the timing
        max_len = int(lengths.max())

        for backend in _fastlm_backends("attention_varlen", qp, kp, vp, b):

            def varlen(q, k, v, backend=backend):
                return fastlm.attention_varlen(q, k, v, cu, cu, max_len, max_len, backend=backend)

            times = _time_passes(varlen, qp, kp, vp, ("fwd", "fwd+bwd"))
            name = "fastlm-varlen" + ("" if backend == "triton" else "-cuda")
            _record(res, "padding", name, torch.float16, shape, times, flops)

        sdpa_mask = mask[:, None, None, :]  # (B, 1, 1, S), True = attend
        for kind in SDPA:
            times = _time_passes(_sdpa(kind, False, sdpa_mask), q, k, v, ("fwd", "fwd+bwd"))
            _record(res, "padding", kind + "-masked", torch.float16, shape, times, flops)


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
