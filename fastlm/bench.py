"""``python -m fastlm bench``: each public op against its PyTorch equivalent, on this device.

A quick look that needs nothing but the installed package: the inputs of ``python -m
fastlm check`` (fastlm/selfcheck_ops.py: small, fixed shapes), the forward pass only, each
side timed by ``torch.utils.benchmark.Timer.blocked_autorange`` (synchronizes CUDA, reports
the median over blocks of repeats). The shapes are small, so on a GPU this measures the
public-op path (validation, dispatch, launch) as much as the kernel. The full benchmark
suite (shape sweeps, roofline bytes, model throughput, committed results) lives in the
repository's ``benchmarks/`` (``make bench``) and is not part of the installed package.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.utils.benchmark import Timer

from fastlm._help_text import plain
from fastlm.selfcheck_ops import CHECKS


def median_ms(fn, min_run_time: float) -> float:
    """Median milliseconds per call of ``fn()`` (blocks of repeats, CUDA synchronized)."""
    fn()  # warm-up: compiles a kernel or builds a cache outside the timed region
    return (
        Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastlm bench",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ops", nargs="*", help="only these ops (default: all)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 / float16 / bfloat16 (default: fp16 on GPU, fp32 on CPU)",
    )
    p.add_argument("--backend", default=None, help="force a fastlm backend (default: automatic)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per side")
    args = p.parse_args(argv or [])
    known = [c.op for c in CHECKS]
    if unknown := sorted(set(args.ops) - set(known)):
        print(f"unknown op(s) {unknown}; known: {known}")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype, None) if args.dtype else default
    if not isinstance(dtype, torch.dtype):
        print(f"unknown dtype {args.dtype!r}")
        return 2
    print(
        f"fastlm bench on {device}, {str(dtype)[6:]}, backend {args.backend or 'auto'} (forward, median)"
    )
    print(f"{'op':<24}{'fastlm ms':>11}{'torch ms':>11}{'speedup':>9}")
    for check in CHECKS:
        if args.ops and check.op not in args.ops:
            continue
        torch.manual_seed(0)
        inputs = check.make(dtype, device)
        with torch.no_grad():
            ours = median_ms(
                functools.partial(check.run, args.backend, **inputs), args.min_run_time
            )
            theirs = median_ms(functools.partial(check.lowp, **inputs), args.min_run_time)
        print(f"{check.op:<24}{ours:>11.4f}{theirs:>11.4f}{theirs / ours:>8.2f}x")
    return 0
