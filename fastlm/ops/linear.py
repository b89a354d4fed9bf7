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
:data:`STREAMED_WEIGHT` elements run as ``(W x^T + b)^T``, a single row padded with a zero
row (two rows take the GEMM kernel; one would take the GEMV again). More rows are a
compute-bound GEMM that ``F.linear`` serves well; tiny weights stay in cache, where the
extra copy costs more than it saves; other devices, and torch.compile (which would
guard on the row count), keep ``F.linear``. Each output is the
same sum over K; only the BLAS's blocking differs, so results agree to fp32 rounding.
Differentiable (the products are plain torch ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Row counts that take the streamed form on CPU (see the module docstring).
FEW_ROWS = range(1, 17)
# Weights from this many elements (2 MiB in fp32; GPT-2 124M's smallest is 768 x 768) take
# it: a model's weights together outgrow the caches long before, and smaller ones are cheap
# either way.
STREAMED_WEIGHT = 1 << 19


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; few-row CPU products in the streamed form above."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)  # traced: no branch on the (symbolic) row count
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows in FEW_ROWS and weight.numel() >= STREAMED_WEIGHT and weight.is_contiguous():
        flat = x.reshape(rows, k)
        if rows == 1:  # a second (zero) row keeps the BLAS on its GEMM kernel
            flat = torch.cat([flat, flat.new_zeros(1, k)])
        yt = (
            torch.mm(weight, flat.t())
            if bias is None
            else torch.addmm(bias[:, None], weight, flat.t())
        )
        # F.linear's contiguous (R, N) layout for the ops downstream: a copy of R x N outputs,
        # small next to the pass over the N x K weight.
        return yt.t()[:rows].contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
