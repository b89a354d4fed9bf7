"""The GEMMs of a GPT-2 124M decode step (1-16 rows) and of a BERT-base-sized layer stack
(32-128 rows) on CPU: transformers' forms against ``fastlm.ops.linear``, fp32, with each of
its forms pinned (F.linear; ``(W x^T + b)^T`` for 1..16 rows; oneDNN's inner product) next
to the form it settles on by its trial (why: fastlm/ops/linear.py).

* ``lm_head``: the tied (50257, 768) weight; transformers ``F.linear(x, W)``;
* ``blocks``: the 48 weights of the 12 blocks (c_attn, attn c_proj, c_fc, mlp c_proj) in
  turn, 340 MB, as one decode step reads them; transformers' Conv1D ``addmm(b, x, W)``
  over (in, out) weights, fastlm's linear over the same weights stored (out, in). Their
  shapes are BERT-base's layers' too (QKV fused, output, FFN up and down), so the rows
  past 16 stand for an encoder's batch of tokens.

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
from fastlm.ops import linear as linear_module
from fastlm.ops.linear import linear

# fastlm.ops.linear's forms, each pinned as FASTLM_CPU_LINEAR would pin it.
PINNED = ("linear", "streamed", "onednn")


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

    def settled(gemm: str, rows: int) -> str:
        """The form each of the gemm's weight shapes settled on at this row count."""
        return " ".join(
            f"{n}x{k}:{form}"
            for (cls, (n, k), *_), form in linear_module._measured.items()
            if isinstance(cls, int)  # a product's key (the half form's start with "widened")
            and cls == linear_module._trial_class(rows)
            and (n == vocab) == (gemm == "lm_head")
        )

    def pinned(form, fn, *args):
        def call():
            before, linear_module.FORM = linear_module.FORM, form
            try:
                return fn(*args)
            finally:
                linear_module.FORM = before

        return call

    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16, 32, 128):
            x = torch.randn(rows, e)
            xs = {e: x, 4 * e: torch.randn(rows, 4 * e)}
            cases = {
                "lm_head": {
                    "transformers": lambda: F.linear(x, head),
                    "fastlm": lambda: linear(x, head),
                    **{f"fastlm {f}": pinned(f, linear, x, head) for f in PINNED},
                },
                "blocks": {
                    "transformers": lambda: hf_blocks(xs),
                    "fastlm": lambda: fastlm_blocks(xs),
                    **{f"fastlm {f}": pinned(f, fastlm_blocks, xs) for f in PINNED},
                },
            }
            for gemm, fns in cases.items():
                for _ in range(len(PINNED) * (linear_module.TRIAL_RUNS + 1)):  # settle the trials
                    fns["fastlm"]()
                _, ms = time_calls(fns, 3 if args.quick else args.repeats, torch.device("cpu"))
                for impl, t in ms.items():
                    res.add(gemm=gemm, rows=rows, impl=impl, ms=t,
                            speedup=ms["transformers"] / t,
                            settled=settled(gemm, rows) if impl == "fastlm" else "")  # fmt: skip
    res.save(table_cols=["gemm", "rows", "impl", "ms", "speedup", "settled"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
