"""``linear(x, weight, bias)``: ``F.linear``, with two CPU products computed in the form
this host's BLAS runs fastest, each chosen by measurement where it runs.

    y = x W^T + b        x (..., K) with R = prod(...) rows, W (N, K), b (N,) -> (..., N)

**Half-precision products in fp32 ("widened").** A bf16 or fp16 GEMM is fast on a CPU with
a half-precision matrix unit (AMX, AVX512-BF16); without one the BLAS converts as it goes
and runs far slower than fp32: on this project's 2-core AVX2 host a bf16 1024 x 384 by
1536 x 384 product takes 139 ms against 25 ms in fp32, and the linears are 95% of a bf16
MiniLM forward. The widened form converts the operands to fp32 (exact: every half value is
an fp32 value), runs the fp32 GEMM and rounds the result once to the half dtype: the math
of a native half GEMM, which also sums the exact products in fp32, with another blocking
of the sum. Under ``torch.autocast`` the operands are first cast to the autocast dtype, as
autocast casts F.linear's, so the rounding of the inputs is autocast's too.

**Few-row products streamed over the weight ("streamed").** A decode step multiplies a few
rows (R = batch size) by every weight of the model, and the weights of a whole model are
far larger than any cache, so each product costs one pass over its weight from memory. On
CPU how fast that pass goes depends on the form of the product handed to the BLAS
(``benchmarks/bench_linear.py``; 2-core x86, MKL, fp32, GPT-2 124M):

* ``F.linear`` asks for ``x W^T`` with W transposed: a GEMV for one row (13-17 GB/s) and,
  for 2-16 rows, a small-row GEMM kernel that rereads W: GPT-2's 50257 x 768 LM head
  takes 12 ms for one row and 25-40 ms for 2-16;
* ``(W x^T)^T`` is a tall GEMM over W in its stored row-major order, one pass at about
  35 GB/s (the machine reads 46 GB/s): 4-6 ms for 1-4 rows of the same LM head, and
  15-18 ms against 20-44 ms for the 48 block weights of GPT-2 at 1-4 rows.

So on CPU, 1 to 16 rows against a row-major (contiguous) weight of at least
:data:`STREAMED_WEIGHT` elements may run as ``(W x^T + b)^T``, a single row padded with a zero
row (two rows take the GEMM kernel; one would take the GEMV again).

**Chosen where they run.** Which form wins depends on the host's CPU and BLAS: the
streamed form won 2-3x on one host and lost on another of the same machine kind (AMX,
another BLAS path: 0.83x at 16-32 rows), and the widened form can only lose to a CPU with a
half-precision unit. So the first product of each key (row class, weight shape, dtype,
bias) times the candidate forms on the real weight (best of a few runs each, so a busy
neighbour does not decide it) and remembers the winner for the process. The row class is
the row count for 1-16 rows and :data:`PROBE_ROWS` (where it is timed) for more: above a
few hundred rows a GEMM is compute-bound and the forms keep their ratio.
``FASTLM_CPU_LINEAR=streamed|linear`` and ``FASTLM_CPU_HALF_LINEAR=widened|native`` pin a
form (tests, benchmarks of one form); the default of both is ``measure``.

More rows keep ``F.linear`` in fp32 (a compute-bound GEMM it serves well); tiny weights
stay in cache, where the extra copies cost more than they save; other devices, and
torch.compile (which would guard on the row count), keep ``F.linear``. Each output is the
same sum over K; only the BLAS's blocking differs, so results agree to the rounding of
their dtype. Differentiable (the products are plain torch ops).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastlm.ops import _autocast

# Row counts that take the streamed form on CPU (see the module docstring).
FEW_ROWS = range(1, 17)
# Weights from this many elements (2 MiB in fp32; GPT-2 124M's smallest is 768 x 768) take
# it: a model's weights together outgrow the caches long before, and smaller ones are cheap
# either way.
STREAMED_WEIGHT = 1 << 19
# Half-precision weights from this many elements may take the widened form (a 256 x 256
# product and up: smaller ones, a classifier's 2 x 768, cost nothing either way and are not
# worth a measurement).
WIDENED_WEIGHT = 1 << 16
HALF_DTYPES = (torch.bfloat16, torch.float16)
# More rows than FEW_ROWS are timed at this many (a compute-bound GEMM: the ratio holds).
PROBE_ROWS = 256
# "measure" (default): each key's faster form on this host; otherwise pinned.
FORM = os.environ.get("FASTLM_CPU_LINEAR", "measure")
_FORMS = ("measure", "streamed", "linear")
HALF_FORM = os.environ.get("FASTLM_CPU_HALF_LINEAR", "measure")
_HALF_FORMS = ("measure", "widened", "native")
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


def _widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The half-precision product as fp32 math on the exactly widened operands, rounded once
    to x's dtype."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def _best_ms(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(MEASURE_RUNS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _first_wins(key: tuple, rows: int, weight: torch.Tensor, bias: torch.Tensor | None,
                first: Callable, second: Callable) -> bool:  # fmt: skip
    """Whether ``first(x, weight, bias)`` beats ``second`` on ``rows`` random rows against
    the real weight: measured once per key and remembered for the process."""
    won = _measured.get(key)
    if won is None:
        with torch.no_grad():
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            first_ms = _best_ms(lambda: first(x, weight, bias))
            second_ms = _best_ms(lambda: second(x, weight, bias))
        won = _measured[key] = first_ms < second_ms
    return won


def _row_class(rows: int) -> int:
    return rows if rows in FEW_ROWS else PROBE_ROWS


def streamed_wins(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the streamed form is the faster one for this product on this host (pinned by
    FORM, else measured once per key and remembered)."""
    if FORM not in _FORMS:
        raise ValueError(f"FASTLM_CPU_LINEAR must be one of {_FORMS}, got {FORM!r}")
    if FORM != "measure":
        return FORM == "streamed"
    key = ("streamed", rows, tuple(weight.shape), weight.dtype, bias is not None)
    return _first_wins(key, rows, weight, bias, _streamed, F.linear)


def widened_wins(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether fp32 math beats the native half-precision GEMM for this product on this host
    (pinned by HALF_FORM, else measured once per key and remembered)."""
    if HALF_FORM not in _HALF_FORMS:
        raise ValueError(f"FASTLM_CPU_HALF_LINEAR must be one of {_HALF_FORMS}, got {HALF_FORM!r}")
    if HALF_FORM != "measure":
        return HALF_FORM == "widened"
    rows = _row_class(rows)
    key = ("widened", rows, tuple(weight.shape), weight.dtype, bias is not None)
    return _first_wins(key, rows, weight, bias, _widened, F.linear)


def _takes_widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   rows: int) -> bool:  # fmt: skip
    return (
        x.dtype in HALF_DTYPES
        and weight.dtype == x.dtype  # mixed dtypes: F.linear's own error
        and (bias is None or bias.dtype == x.dtype)
        and weight.numel() >= WIDENED_WEIGHT
        and rows > 0
        and widened_wins(rows, weight, bias)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; CPU products in the measured faster form above."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)  # traced: no branch on the (symbolic) row count
    amp = _autocast.dtype_for(x)
    if amp is not None:  # autocast's policy for F.linear: every operand in its dtype
        with _autocast.disabled(x.device):
            return linear(*_autocast.cast(amp, x, weight, bias))
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if _takes_widened(x, weight, bias, rows):
        return _widened(x, weight, bias)
    if (
        rows in FEW_ROWS
        and weight.numel() >= STREAMED_WEIGHT
        and weight.is_contiguous()
        and streamed_wins(rows, weight, bias)
    ):
        y = _streamed(x.reshape(rows, k), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
