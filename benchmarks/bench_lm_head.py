"""The LM head of a decode step on CPU: ``F.linear(h, W)`` against fastlm's ``lm_logits``
(``(W h^T)^T`` for 2..16 rows), for R = 1..32 rows against GPT-2's tied (50257, 768) fp32
weight, in one process. Why the two differ: fastlm/models/lm_logits.py.

The weight (154 MB) is far larger than any cache, so both sides read it from memory on
every call, as a decode step does. Timing: wall clock, median of ``--repeats`` calls after
a warm-up, the two sides interleaved call by call so a busy spell slows both alike.

    python -m benchmarks.bench_lm_head         # -> benchmarks/results/cpu/lm_head.*
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import Results
from fastlm.models.lm_logits import lm_logits


def interleaved_medians_ms(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu)")
    p.add_argument("--quick", action="store_true", help="a 16 MB weight, 3 repeats (smoke run)")
    args = p.parse_args(argv)
    vocab, embed = (8192, 512) if args.quick else (50257, 768)
    weight = torch.randn(vocab, embed)
    res = Results("lm_head", args.out)
    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16, 32):
            h = torch.randn(rows, embed)
            ms = interleaved_medians_ms(
                {
                    "F.linear": lambda: F.linear(h, weight),
                    "lm_logits": lambda: lm_logits(h, weight),
                },
                3 if args.quick else args.repeats,
            )
            for impl, t in ms.items():
                res.add(rows=rows, vocab=vocab, embed=embed, impl=impl, ms=t,
                        speedup_vs_linear=ms["F.linear"] / t)  # fmt: skip
    res.save(table_cols=["rows", "impl", "ms", "speedup_vs_linear"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
