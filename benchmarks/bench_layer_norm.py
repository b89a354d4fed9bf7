"""LayerNorm: fastlm (triton, cuda) vs torch.nn.functional.layer_norm eager and torch.compile.

M = 4096 rows, N = 1024..16384, fp16/bf16/fp32, forward and backward. Bandwidth counts the
minimum bytes: forward reads x and writes y (2x tensor bytes), backward reads x
and dy and writes dx (3x). Weight/bias traffic is negligible and not counted.

``headline(res, device, timer, dry)``: the GPU check's rows (N 4096 and 8192, GB/s vs torch).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import harness


def _impls(device, with_compile=True):
    import fastlm

    def fast(backend):
        return lambda x, w, b: fastlm.layer_norm(x, w, b, 1e-5, backend=backend)

    x = torch.randn(2, 64, device=device)
    impls = {
        f"fastlm-{name}": fast(name)
        for name in harness.fastlm_backends(lambda bk: fast(bk)(x, None, None))
    }
    eager = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5)
    impls["torch"] = eager
    if with_compile:
        impls["torch.compile"] = torch.compile(eager, dynamic=False)
    return impls


def run(res, impls, m, ns, dtypes, device="cuda", timer=None) -> None:
    """Forward and backward of every implementation at (m, n) for n in ns, in GB/s and as a
    speed-up over torch measured in the same process."""
    for dtype in dtypes:
        for n in ns:
            x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(m, n, device=device, dtype=dtype)
            nbytes = x.numel() * x.element_size()
            base = {}
            for name, fn in impls.items():
                fwd = harness.bench_or_none(lambda fn=fn: fn(x, w, b), timer=timer)
                y = fn(x, w, b)
                bwd_total = harness.bench_or_none(
                    lambda y=y: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True),
                    timer=timer,
                )
                for pass_, ms, moved in (("fwd", fwd, 2 * nbytes), ("bwd", bwd_total, 3 * nbytes)):
                    if ms is None:
                        continue
                    base.setdefault(pass_, {})[name] = ms
                    ref = base[pass_].get("torch")
                    res.add(
                        op="layer_norm", impl=name, pass_=pass_, dtype=dtype, shape={"M": m, "N": n},
                        ms=ms, gbps=moved / ms * 1e-6, speedup_vs_torch=(ref / ms) if ref else None,
                    )  # fmt: skip


def headline(res, device, timer=None, dry=False, budget=None) -> None:
    """The GPU check's rows: M 4096 x N 4096 and 8192, fp16 and bf16, fastlm vs torch (no
    torch.compile); the dry run: 8 x 96 in fp32 through the interpreter."""
    impls = _impls(device, with_compile=False)
    if dry:
        run(res, impls, 8, [96], [torch.float32], device, timer)
    else:
        run(res, impls, 4096, [4096, 8192], [torch.float16, torch.bfloat16], device, timer)


def main(argv: list[str] | None = None) -> None:
    harness.require_gpu("bench_layer_norm")
    args = harness.parse_args(__doc__, argv)
    res = harness.Results("layer_norm", args.out)
    ns = [1024, 4096, 16384] if args.quick else [768, 1024, 2048, 4096, 8192, 12288, 16384]
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16, torch.float32]
    run(res, _impls(torch.device("cuda")), 4096, ns, dtypes)
    rows = [r for r in res.rows if r["pass"] == "fwd" and r["dtype"] == "float16"]
    res.save(
        plot=harness.line_plot(rows, "N", "gbps", "impl", "LayerNorm forward, fp16, M=4096 (GB/s)")
    )


if __name__ == "__main__":
    main(sys.argv[1:])
