"""The GEMMs of a GPT-2 124M decode step on CPU: transformers' forms against
``fastlm.ops.linear`` (``(W x^T + b)^T`` for 1..16 rows; why: fastlm/ops/linear.py), fp32.

* ``lm_head``: the tied (50257, 768) weight; transformers ``F.linear(x, W)``;
* ``blocks``: the 48 weights of the 12 blocks (c_attn, attn c_proj, c_fc, mlp c_proj) in
  turn, 340 MB, as one decode step reads them; transformers' Conv1D ``addmm(b, x, W)``
  over (in, out) weights, fastlm's linear over the same weights stored (out, in).

Every weight streams from memory, as in a real step. Timing: wall clock, median of
``--repeats`` after a warm-up, the two sides interleaved so a busy spell slows both alike.

    python -m benchmarks.bench_linear        # -> benchmarks/results/cpu/linear.*
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import Results
from fastlm.demo.timing import time_calls
from fastlm.ops.linear import linear


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu)")
    p.add_argument("--quick", action="store_true", help="2 layers, a 16 MB head, 3 repeats")
    args = p.parse_args(argv)
    vocab, layers = (8192, 2) if args.quick else (50257, 12)
    e = 768
    head = torch.randn(vocab, e)
    shapes = [(e, 3 * e), (e, e), (e, 4 * e), (4 * e, e)] * layers  # Conv1D (in, out)
    conv = [torch.randn(i, o) for i, o in shapes]  # transformers' layout
    rowmajor = [w.t().contiguous() for w in conv]  # fastlm's: (out, in) storage
    biases = [torch.randn(o) for _, o in shapes]
    res = Results("linear", args.out)

    def hf_blocks(xs):
        return [torch.addmm(b, xs[w.shape[0]], w) for w, b in zip(conv, biases)]

    def fastlm_blocks(xs):
        return [linear(xs[w.shape[1]], w, b) for w, b in zip(rowmajor, biases)]

    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16, 32):
            x = torch.randn(rows, e)
            xs = {e: x, 4 * e: torch.randn(rows, 4 * e)}
            cases = {
                "lm_head": {
                    "transformers": lambda: F.linear(x, head),
                    "fastlm": lambda: linear(x, head),
                },
                "blocks": {
                    "transformers": lambda: hf_blocks(xs),
                    "fastlm": lambda: fastlm_blocks(xs),
                },
            }
            for gemm, fns in cases.items():
                _, ms = time_calls(fns, 3 if args.quick else args.repeats, torch.device("cpu"))
                for impl, t in ms.items():
                    res.add(gemm=gemm, rows=rows, impl=impl, ms=t,
                            speedup=ms["transformers"] / t)  # fmt: skip
    res.save(table_cols=["gemm", "rows", "impl", "ms", "speedup"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
