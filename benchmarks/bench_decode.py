"""KV-cache decode attention: fastlm.attention_with_kvcache vs SDPA over a sliced cache.

One new token per sequence (Sq = 1) attends to a cache holding ``ctx`` tokens, for batch
1..64, context 512..16384, GPT-2 small heads (12 x 64) and 16/32 x 128, fp16 and bf16.
Decode is bound by reading the cache, so the figure of merit is the achieved bandwidth

    GB/s = 2 (K and V) * B * ctx * Hkv * D * bytes_per_element / time

and its share of the HBM peak, taken as a device-to-device copy measured in this process
(read + write bytes / time). Rows:

* fastlm-<backend>         attention only (k=None), the like-for-like comparison with SDPA;
* fastlm-<backend>+append  the full decode step: write the new k, v into the cache, attend;
  <backend> is triton, and cuda (csrc/attention_decode.cu; its append is torch indexing)
  wherever a trial call with backend="cuda" runs (the extension is built);
* sdpa-<flash|efficient|cudnn>  F.scaled_dot_product_attention on k_cache[:, :ctx];
* reference                fastlm.reference (PyTorch eager, fp32), where it fits in memory.

``headline(res, device, timer, dry)``: the GPU check's rows (8 K context, GPT-2 and 32 x 128
heads, fp16), tiny through the interpreter for its dry run.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    Results,
    bench,
    bench_or_none,
    fastlm_backends,
    line_plot,
    parse_args,
    require_gpu,
)
from fastlm.ops._checks import default_softmax_scale

HEADS = [(12, 64), (16, 128), (32, 128)]  # (heads, head_dim)
BATCHES = [1, 4, 16, 64]
CONTEXTS = [512, 2048, 8192, 16384]
DTYPES = [torch.float16, torch.bfloat16]
QUICK = dict(
    heads=[(12, 64), (32, 128)], batches=[1, 16], contexts=[2048, 8192], dtypes=[torch.float16]
)
REFERENCE_MAX_BYTES = 4 << 30  # the reference upcasts the cache to fp32: skip it beyond this


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """HBM peak stand-in: device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms * 1e-6


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }


def _math():
    from torch.nn.attention import SDPBackend

    return SDPBackend.MATH


def _sdpa(q, k_cache, v_cache, ctx, backends):
    from torch.nn.attention import sdpa_kernel

    # (B, 1, H, D) / (B, ctx, H, D) views -> (B, H, *, D); strides kept, no copy.
    qt = q.transpose(1, 2)
    kt = k_cache[:, :ctx].transpose(1, 2)
    vt = v_cache[:, :ctx].transpose(1, 2)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def _check_close(name: str, out: torch.Tensor, want: torch.Tensor) -> None:
    """Every timed fastlm result is also checked, so a fast wrong kernel cannot hide here."""
    err = (out.float() - want.float()).abs().max().item()
    if not err <= 2e-2:
        raise RuntimeError(f"{name}: max abs error {err:.3e} against SDPA (math) is too large")


def bench_shape(
    res: Results, peak_gbps: float, bsz, ctx, heads, d, dtype, dev: torch.device, timer=None
) -> None:
    """Every implementation on one decode shape; ``timer`` replaces harness.bench."""
    import fastlm
    from fastlm.reference import attention_kvcache as ref

    timer = timer or bench

    s_max = ctx + 1  # room for the appended token
    k_cache = torch.randn(bsz, s_max, heads, d, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(bsz, 1, heads, d, device=dev, dtype=dtype)
    k_new = torch.randn(bsz, 1, heads, d, device=dev, dtype=dtype)
    v_new = torch.randn_like(k_new)
    seqlens = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
    cache_bytes = 2 * bsz * ctx * heads * d * k_cache.element_size()
    shape = dict(B=bsz, ctx=ctx, H=heads, D=d)

    def add(impl: str, ms: float | None, nbytes: int = cache_bytes) -> None:
        if ms is None:
            return
        gbps = nbytes / ms * 1e-6
        res.add(
            op="attention_with_kvcache", impl=impl, dtype=dtype, shape=shape, ms=ms, gbps=gbps,
            pct_peak=100.0 * gbps / peak_gbps,
        )  # fmt: skip

    # The check result: SDPA with the first backend that serves the shape (flash reads the
    # strided cache without copies, so this fits in memory at every benchmarked size).
    want = _sdpa(q, k_cache, v_cache, ctx, [*_sdpa_backends().values(), _math()])

    def attend(backend, **new):
        return fastlm.attention_with_kvcache(q, k_cache, v_cache, seqlens, backend=backend, **new)

    # torch is timed as "reference" below.
    for backend in fastlm_backends(attend):
        _check_close(f"fastlm-{backend}", attend(backend), want)
        add(f"fastlm-{backend}", timer(functools.partial(attend, backend)))
        # The full step writes the same slot every run (seqlens is not advanced): idempotent.
        step = functools.partial(attend, backend, k=k_new, v=v_new)
        add(f"fastlm-{backend}+append", timer(step))

    for name, sdpa_backend in _sdpa_backends().items():
        add(
            f"sdpa-{name}",
            bench_or_none(lambda b=sdpa_backend: _sdpa(q, k_cache, v_cache, ctx, [b]), timer=timer),
        )
    if cache_bytes * 4 // k_cache.element_size() <= REFERENCE_MAX_BYTES:
        add(
            "reference",
            bench_or_none(
                lambda: ref.kvcache_attention(
                    q, k_cache, v_cache, seqlens, True, default_softmax_scale(q.shape[-1])
                ),
                timer=timer,
            ),
        )


def headline(res: Results, device, timer=None, dry=False, budget=None) -> None:
    """The GPU check's decode rows: an 8 K context, batch 8, GPT-2 heads (12 x 64) and
    32 x 128, fp16, in GB/s and % of the copy bandwidth measured here (the dry run: one tiny
    shape through the interpreter, no bandwidth claim)."""
    shapes = [(2, 40, 2, 32)] if dry else [(8, 8192, 12, 64), (8, 8192, 32, 128)]
    dtype = torch.float32 if dry else torch.float16
    peak = 1.0 if dry else copy_bandwidth_gbps(device)
    for bsz, ctx, heads, d in shapes:
        if budget is not None and not budget():
            return
        print(f"decode B={bsz} ctx={ctx} H={heads} D={d} {dtype}", flush=True)
        bench_shape(res, peak, bsz, ctx, heads, d, dtype, device, timer)
    for row in res.rows:
        if row.get("op") == "attention_with_kvcache":
            row["copy_peak_gbps"] = None if dry else round(peak, 1)


def main(argv: list[str] | None = None) -> None:
    require_gpu("bench_decode")
    args = parse_args("KV-cache decode attention (Sq = 1) vs SDPA", argv)
    cfg = (
        QUICK
        if args.quick
        else dict(heads=HEADS, batches=BATCHES, contexts=CONTEXTS, dtypes=DTYPES)
    )
    peak = copy_bandwidth_gbps(torch.device("cuda"))
    print(f"device-to-device copy bandwidth (the peak used for pct_peak): {peak:.0f} GB/s")
    res = Results("decode", args.out)
    for dtype in cfg["dtypes"]:
        for heads, d in cfg["heads"]:
            for bsz in cfg["batches"]:
                for ctx in cfg["contexts"]:
                    print(f"decode B={bsz} ctx={ctx} H={heads} D={d} {dtype}", flush=True)
                    bench_shape(res, peak, bsz, ctx, heads, d, dtype, torch.device("cuda"))
                    torch.cuda.empty_cache()  # the caches of this shape are gone now
    for row in res.rows:
        row["copy_peak_gbps"] = round(peak, 1)
    # The plot: bandwidth against context for one representative shape family.
    plot_rows = [
        r
        for r in res.rows
        if r["shape"]["B"] == max(cfg["batches"]) and r["shape"]["H"] == cfg["heads"][-1][0]
        and r["dtype"] == "float16"
    ]  # fmt: skip
    title = (
        f"decode, B={max(cfg['batches'])}, H={cfg['heads'][-1][0]}, D={cfg['heads'][-1][1]}, fp16"
    )
    res.save(plot=line_plot(plot_rows, x="ctx", y="gbps", series="impl", title=title))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
