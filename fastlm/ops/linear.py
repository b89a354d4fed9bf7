"""``linear(x, weight, bias)``: ``F.linear`` with the few-row GEMMs of a CPU decode step
computed in the form the BLAS streams fastest.

    y = x W^T + b        x (..., K) with R = prod(...) rows, W (N, K), b (N,) -> (..., N)

A decode step multiplies a few rows (R = batch size) by every weight of the model, and
the weights of a whole model are far larger than any cache, so each product costs one
pass over its weight from memory. On CPU how fast that pass goes depends on the form
of the product handed to the BLAS (``benchmarks/bench_linear.py``; 2-core x86, MKL, fp32,
GPT-2 124M):

* ``F.linear`` asks for ``x W^T`` with W transposed: a GEMV for one row (13-17 GB/s) and,
  for 2-16 rows, a small-row GEMM kernel that rereads W: GPT-2's 50257 x 768 LM head
  takes 12 ms for one row and 25-40 ms for 2-16;
* ``(W x^T)^T`` is a tall GEMM over W in its stored row-major order, one pass at about
  35 GB/s (the machine reads 46 GB/s): 4-6 ms for 1-4 rows of the same LM head, and
  15-18 ms against 20-44 ms for the 48 block weights of GPT-2 at 1-4 rows.

So on CPU, 1 to 16 rows against a row-major (contiguous) weight of at least
:data:`STREAMED_WEIGHT` elements may run as ``(W x^T + b)^T``, a single row padded with a zero
row (two rows take the GEMM kernel; one would take the GEMV again).

Which form wins depends on the host's BLAS and CPU: the figures above are from one host;
on another of the same machine kind (AMX, another BLAS path) the streamed form lost
(0.83x at 16-32 rows, generate 0.50x). So the form is chosen by measurement where it runs:
the first product of each (rows, weight shape, dtype, bias) times both forms on the real
weight (best of a few runs each, so a busy neighbour does not decide it) and remembers the
winner for the process. ``FASTLM_CPU_LINEAR=streamed|linear`` pins one form (tests,
benchmarks of one form); the default is ``measure``. More rows are a
compute-bound GEMM that ``F.linear`` serves well; tiny weights stay in cache, where the
extra copy costs more than it saves; other devices, and torch.compile (which would
guard on the row count), keep ``F.linear``. Each output is the
same sum over K; only the BLAS's blocking differs, so results agree to fp32 rounding.
Differentiable (the products are plain torch ops).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

# Row counts that take the streamed form on CPU (see the module docstring).
FEW_ROWS = range(1, 17)
# Weights from this many elements (2 MiB in fp32; GPT-2 124M's smallest is 768 x 768) take
# it: a model's weights together outgrow the caches long before, and smaller ones are cheap
# either way.
STREAMED_WEIGHT = 1 << 19
# "measure" (default): each shape's faster form on this host; "streamed" / "linear": pinned.
FORM = os.environ.get("FASTLM_CPU_LINEAR", "measure")
_FORMS = ("measure", "streamed", "linear")
# Timed runs of each form when measuring (after one warm-up); the best run counts.
MEASURE_RUNS = 3
_measured: dict[tuple, bool] = {}


def _streamed(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(W x^T + b)^T for ``flat`` (R, K) rows -> (R, N) contiguous."""
    rows = flat.shape[0]
    if rows == 1:  # a second (zero) row keeps the BLAS on its GEMM kernel
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
    yt = (
        torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
    )
    # F.linear's contiguous (R, N) layout for the ops downstream: a copy of R x N outputs,
    # small next to the pass over the N x K weight.
    return yt.t()[:rows].contiguous()


def _best_ms(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(MEASURE_RUNS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def streamed_wins(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the streamed form is the faster one for this product on this host (pinned by
    FORM, else measured once per key and remembered)."""
    if FORM not in _FORMS:
        raise ValueError(f"FASTLM_CPU_LINEAR must be one of {_FORMS}, got {FORM!r}")
    if FORM != "measure":
        return FORM == "streamed"
    key = (rows, tuple(weight.shape), weight.dtype, bias is not None)
    won = _measured.get(key)
    if won is None:
        with torch.no_grad():
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            streamed_ms = _best_ms(lambda: _streamed(x, weight, bias))
            linear_ms = _best_ms(lambda: F.linear(x, weight, bias))
        won = _measured[key] = streamed_ms < linear_ms
    return won


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; few-row CPU products in the streamed form above."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)  # traced: no branch on the (symbolic) row count
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (
        rows in FEW_ROWS
        and weight.numel() >= STREAMED_WEIGHT
        and weight.is_contiguous()
        and streamed_wins(rows, weight, bias)
    ):
        y = _streamed(x.reshape(rows, k), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
