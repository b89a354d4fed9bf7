"""``linear(x, weight, bias)``: ``F.linear``, with CPU products computed in the form this
host runs fastest, chosen by measurement where it runs.

    y = x W^T + b        x (..., K) with R = prod(...) rows, W (N, K), b (N,) -> (..., N)

**oneDNN's inner product where autograd records nothing ("onednn").** ``F.linear`` on CPU
is an MKL GEMM (``addmm``). PyTorch also ships oneDNN, whose matmul kernels (the ones its
compiler calls for a frozen model, ``mkldnn::_linear_pointwise``) read the plain weight and
beat MKL's at some shapes of some hosts: on this project's 2-core AMD host (AVX2, MKL
2024.2), with the weights streaming from memory as in a model, 1.2-1.6x as fast as
``F.linear`` over BERT-base-sized layers at 1 and 32-128 rows and 1.5-2.3x over GPT-2's LM
head, while the streamed form beats both at 2-16 rows (``benchmarks/bench_linear.py``); in
a model, GPT-2 greedy generate at batch 1 1.7 s against 2.1-2.3 s with the other forms
pinned, a BERT-base 1x128 forward 1.1-1.2x, MiniLM's layers a tie. It has no backward,
so it serves only products whose operands autograd does not record (inference,
``no_grad``, frozen weights and inputs), fp32 only (this host's oneDNN has no
half-precision inner product: without a half-precision unit it refuses one).

**Half-precision products in fp32 ("widened").** A bf16 or fp16 GEMM is fast on a CPU with
a half-precision matrix unit (AMX, AVX512-BF16); without one the BLAS converts as it goes
and runs far slower than fp32: on this project's 2-core AVX2 host a bf16 1024 x 384 by
1536 x 384 product takes 139 ms against 25 ms in fp32, and the linears are 95% of a bf16
MiniLM forward. The widened form converts the operands to fp32 (exact: every half value is
an fp32 value), runs the fp32 product (in its own measured form) and rounds the result
once to the half dtype: the math of a native half GEMM, which also sums the exact products
in fp32, with another blocking of the sum. Under ``torch.autocast`` the operands are first
cast to the autocast dtype, as autocast casts F.linear's, so the rounding of the inputs is
autocast's too. A half-precision layer whose products take this form goes one step
further (:func:`widens_layer`): it runs wholly in fp32 and rounds its output once, so its
activations are not converted around each product nor its attention, GELU and LayerNorms
run in the half dtype.

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
another BLAS path: 0.83x at 16-32 rows), MKL's kernels are tuned for Intel's cores, and the
widened form can only lose to a CPU with a half-precision unit. And it depends on where
the weight is: timed again and again on one weight, the weight sits in cache and oneDNN
(which reorders the weight as it reads it) won products it loses inside a model, where
every other layer's weights pass between two reads of one weight (GPT-2 at 4 rows: the
cached timing chose it over the streamed form and the generate ran 7% slower). So the
forms of an fp32 product are tried on the key's first real products: each call of a key on
trial runs the form tried least so far, timed, and once each form has :data:`TRIAL_RUNS`
timed calls (after an untimed first) the key keeps the form with the least median time per
row for the process. A key is the row class (the row count for 1-16 rows, its power of two
above), the weight's shape and strides, and what decides the forms that may serve (dtypes,
layouts, whether autograd records); a model's layers share their keys, so a model settles
within its first few forwards, and a settled key costs one dictionary lookup a call. While a
key is on trial, two calls on the same input may differ in the last bits (the forms sum in
other orders); ``FASTLM_CPU_LINEAR=linear`` gives F.linear's bits every time. The half
form is chosen by timing both forms on random rows (:data:`PROBE_ROWS` for more than 16)
against the real weight, best of a few runs, once per key: the two differ several-fold
where they differ at all. ``FASTLM_CPU_LINEAR=linear|streamed|onednn`` and
``FASTLM_CPU_HALF_LINEAR=widened|native`` pin a form where it may serve (tests, benchmarks
of one form); the default of both is ``measure``.

Weights under :data:`MEASURED_WEIGHT` elements (a classifier's 2 x 768) cost nothing
either way and keep ``F.linear``; so do other devices and torch.compile (which would guard
on the row count, and runs its own GEMM choice). Each output is the same sum over K; only
the blocking differs, so results agree to the rounding of their dtype. Differentiable
where autograd records (the streamed and widened products are plain torch ops).
"""

from __future__ import annotations

import os
import statistics
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
# Weights from this many elements are worth a measurement (a 256 x 256 product and up:
# smaller ones, a classifier's 2 x 768, cost nothing either way).
MEASURED_WEIGHT = 1 << 16
HALF_DTYPES = (torch.bfloat16, torch.float16)
# The half form's probe times more rows than FEW_ROWS at this many (a compute-bound GEMM:
# the ratio holds).
PROBE_ROWS = 256
# "measure" (default): each key's fastest form on this host; otherwise pinned.
FORM = os.environ.get("FASTLM_CPU_LINEAR", "measure")
_FORMS = ("measure", "linear", "streamed", "onednn")
HALF_FORM = os.environ.get("FASTLM_CPU_HALF_LINEAR", "measure")
_HALF_FORMS = ("measure", "widened", "native")
# Timed runs of each half form in the probe (after one warm-up); the best run counts.
MEASURE_RUNS = 3
# key -> the name of the fastest form, for the process.
_measured: dict[tuple, str] = {}
# Timed calls of each form on a key's real products before the key settles (after an
# untimed first), and the per-row times of the keys still on trial.
TRIAL_RUNS = 8
_trials: dict[tuple, dict[str, list[float]]] = {}
# oneDNN's inner product, where this build of PyTorch has it (its x86 CPU wheels do).
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b by oneDNN's inner product on the plain weight (no activation fused)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _streamed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(W x^T + b)^T for the R rows of ``x`` (..., K) -> (..., N) contiguous."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows == 1:  # a second (zero) row keeps the BLAS on its GEMM kernel
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
    yt = (
        torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
    )
    # F.linear's contiguous (R, N) layout for the ops downstream: a copy of R x N outputs,
    # small next to the pass over the N x K weight.
    return yt.t()[:rows].contiguous().view(*x.shape[:-1], weight.shape[0])


def _widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The half-precision product as fp32 math on the exactly widened operands, rounded once
    to x's dtype."""
    b = None if bias is None else bias.float()
    return _product(x.float(), weight.float(), b).to(x.dtype)


def widened_operands(x: torch.Tensor, *params: torch.Tensor | None) -> tuple:
    """``params`` as a product with ``x`` reads them: for an fp32 ``x`` on CPU (a layer
    computed in fp32, :func:`widens_layer`) each half-precision one widened exactly to fp32;
    otherwise as given (mismatches stay F.linear's own error)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return params
    return tuple(p.float() if p is not None and p.dtype in HALF_DTYPES else p for p in params)


def _best_ms(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(MEASURE_RUNS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _fastest(key: tuple, rows: int, weight: torch.Tensor, bias: torch.Tensor | None,
             forms: dict[str, Callable]) -> Callable:  # fmt: skip
    """The fastest of ``forms`` (name -> form(x, weight, bias)) on ``rows`` random rows
    against the real weight: measured once per key and remembered for the process."""
    name = _measured.get(key)
    if name is None:
        with torch.no_grad():
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            ms = {n: _best_ms(lambda form=form: form(x, weight, bias)) for n, form in forms.items()}
        name = _measured[key] = min(ms, key=ms.get)
    return forms[name]


def _row_class(rows: int) -> int:
    return rows if rows in FEW_ROWS else PROBE_ROWS


def _rows(x: torch.Tensor) -> int:
    """R, the rows of x (..., K): its leading dimensions' product (0 for K = 0 too)."""
    k = x.shape[-1]
    return x.numel() // k if k else 0


def _recorded(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these operands."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _forms(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           rows: int) -> dict[str, Callable]:  # fmt: skip
    """The forms that may serve this product, F.linear first."""
    forms: dict[str, Callable] = {"linear": F.linear}
    if weight.numel() < MEASURED_WEIGHT or rows == 0:
        return forms
    if rows in FEW_ROWS and weight.numel() >= STREAMED_WEIGHT and weight.is_contiguous():
        forms["streamed"] = _streamed
    if (
        ONEDNN
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not _recorded(x, weight, bias)
        # The layouts it reads right: a strided bias comes out wrong, a strided column-major
        # weight raises, so those (rare) products keep the other forms.
        and x.is_contiguous()
        and (weight.is_contiguous() or weight.t().is_contiguous())
        and (bias is None or bias.is_contiguous())
    ):
        forms["onednn"] = _onednn
    return forms


def _trial_class(rows: int) -> int:
    """Row counts timed together in a trial: each few-row count alone, more rows by their
    power of two (the times compared are per row)."""
    return rows if rows in FEW_ROWS else 1 << (rows.bit_length() - 1)


def _tried(key: tuple, forms: dict[str, Callable], x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None, rows: int) -> torch.Tensor:  # fmt: skip
    """One real product of a key still on trial, in the form tried least so far, timed; once
    every form has TRIAL_RUNS timed calls (after an untimed first: oneDNN builds its kernel
    there) the key settles on the form with the least median time per row (a median of
    a few runs: one slow run, a neighbour's burst, moves it less than it moves a mean)."""
    trial = _trials.setdefault(key, {name: [] for name in forms})
    name = min(trial, key=lambda n: len(trial[n]))
    start = time.perf_counter()
    y = forms[name](x, weight, bias)
    trial[name].append((time.perf_counter() - start) / rows)
    if all(len(times) > TRIAL_RUNS for times in trial.values()):
        _measured[key] = min(trial, key=lambda n: statistics.median(trial[n][1:]))
        _trials.pop(key, None)
    return y


def _form(name: str) -> Callable:
    """The form called ``name``, looked up when called (tests wrap the forms)."""
    return {"linear": F.linear, "streamed": _streamed, "onednn": _onednn}[name]


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b in the fastest form that may serve it: pinned by FORM, else tried on the
    key's first real products and settled (see _tried)."""
    rows = _rows(x)
    if FORM != "measure":
        if FORM not in _FORMS:
            raise ValueError(f"FASTLM_CPU_LINEAR must be one of {_FORMS}, got {FORM!r}")
        return _forms(x, weight, bias, rows).get(FORM, F.linear)(x, weight, bias)
    if rows == 0 or weight.numel() < MEASURED_WEIGHT:
        return F.linear(x, weight, bias)
    # Everything _forms reads, so a settled key costs one dict lookup a call (a decode step
    # of a small model makes hundreds of these calls).
    key = (
        _trial_class(rows), weight.shape, weight.stride(), weight.dtype, x.dtype,
        x.is_contiguous(), None if bias is None else (bias.dtype, bias.is_contiguous()),
        _recorded(x, weight, bias),
    )  # fmt: skip
    name = _measured.get(key)
    if name is not None:
        return _form(name)(x, weight, bias)
    forms = _forms(x, weight, bias, rows)
    if len(forms) == 1:
        _measured[key] = "linear"
        return F.linear(x, weight, bias)
    return _tried(key, forms, x, weight, bias, rows)


def widened_wins(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether fp32 math beats the native half-precision GEMM for this product on this host
    (pinned by HALF_FORM, else measured once per key and remembered)."""
    if HALF_FORM not in _HALF_FORMS:
        raise ValueError(f"FASTLM_CPU_HALF_LINEAR must be one of {_HALF_FORMS}, got {HALF_FORM!r}")
    if HALF_FORM != "measure":
        return HALF_FORM == "widened"
    rows = _row_class(rows)
    key = ("widened", rows, tuple(weight.shape), weight.dtype, bias is not None)
    forms = {"widened": _widened, "native": F.linear}
    return _fastest(key, rows, weight, bias, forms) is _widened


def _takes_widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   rows: int) -> bool:  # fmt: skip
    return (
        x.dtype in HALF_DTYPES
        and weight.dtype == x.dtype  # mixed dtypes: F.linear's own error
        and (bias is None or bias.dtype == x.dtype)
        and weight.numel() >= MEASURED_WEIGHT
        and rows > 0
        and widened_wins(rows, weight, bias)
    )


def widens_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether a half-precision layer whose input is ``x`` runs in fp32 on this host: where
    its largest product, by ``weight`` (N, K), takes the widened form (measured, or pinned by
    HALF_FORM), so the layer's other products do too. The layer then widens ``x`` once,
    computes everything in fp32 (its half weights widened exactly in each product, as the
    widened form widens them) and rounds its output once to x's dtype: where it would
    otherwise round after each product, convert each product's input back to fp32, and run
    attention, GELU and the residual adds in a half dtype the CPU has no unit for (MiniLM in
    bf16, 32 x 128 tokens: 1.23x). CPU only, not under torch.compile or autocast (whose
    policy chooses the dtypes there)."""
    if x.dtype not in HALF_DTYPES or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False  # the dtype first: an fp32 layer's check ends there
    if _autocast.dtype_for(x) is not None:
        return False
    return _takes_widened(x, weight, bias, _rows(x))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; CPU products in the measured fastest form above. On CPU
    an fp32 ``x`` may also take a half-precision weight (and bias): a layer computed in fp32
    (:func:`widens_layer`), its weight widened exactly for the product."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)  # traced: no branch on the (symbolic) row count
    amp = _autocast.dtype_for(x)
    if amp is not None:  # autocast's policy for F.linear: every operand in its dtype
        with _autocast.disabled(x.device):
            return linear(*_autocast.cast(amp, x, weight, bias))
    if x.dtype == torch.float32 and weight.dtype in HALF_DTYPES:
        weight, bias = widened_operands(x, weight, bias)
    rows = _rows(x)
    if _takes_widened(x, weight, bias, rows):
        return _widened(x, weight, bias)
    return _product(x, weight, bias)
