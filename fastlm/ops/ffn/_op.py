"""The custom ops behind fastlm.linear_gelu and fastlm.gelu_ffn for the kernel backends
(triton, cuda, reference): ``fastlm::linear_gelu_fwd`` / ``_bwd`` and
``fastlm::gelu_ffn_fwd`` / ``_bwd`` with their fake (meta) versions and the autograd
formulas, so the ops compose with autograd and torch.compile(fullgraph=True).

Operands are 2-D rows: x (M, K), weights (N, K) with any strides. The chain rule is written
here once; each kernel backend supplies the same six primitives, all in the operands' dtype
unless said otherwise:

    linear_act(x, w, b, approximate, store_pre) -> (gelu(x w^T + b), h = x w^T + b or None)
    linear_residual(a, w, b, residual)          -> a w^T + b (+ residual)
    pre_activation(x, w, b)                     -> h = x w^T + b
    gelu_grad(dy, h, approximate, need_db)      -> (dh = dy * gelu'(h), db or None)
    matmul_gelu_grad(dy, w, h, approximate)     -> dh = (dy w) * gelu'(h)
    linear_grads(dh, x, w, need_dx, need_dw)    -> (dx = dh w or None, dW = dh^T x or None)

(db: the row sum of dh in fp32, when the backend fuses it into gelu_grad; None otherwise
and the op sums. The reference backend returns its gradients in fp32/fp64.)

Backward: recompute or store the pre-activation h = x W^T + b? Recomputing h costs a whole
GEMM (2 M N K flops); storing it costs one extra (M, N) write in the forward epilogue, while
the tile is still in registers, and one read in the backward. Storing wins by far, so the
forward stores h exactly when a backward can follow (grad mode on and an input that h's
gradient flows to requires grad) and skips the write for inference. Should h be missing
anyway (a custom-op caller passing store_pre=False), the backward recomputes it rather than
fail.

    linear_gelu:  dh = dy * gelu'(h);  dx = dh W;  dW = dh^T x;  db = sum_rows dh
    gelu_ffn:     dW2 = dout^T a;  db2 = sum_rows dout;  dh1 = (dout W2) * gelu'(h1);
                  dx = dh1 W1;  dW1 = dh1^T x;  db1 = sum_rows dh1;  dresidual = dout
"""

from __future__ import annotations

import math

import torch

from fastlm.ops import _checks as C
from fastlm.ops import _eager
from fastlm.ops.ffn import _cuda, _reference, _torch, _triton
from fastlm.reference._util import compute_dtype

BACKENDS = {"triton": _triton, "cuda": _cuda, "torch": _torch, "reference": _reference}


def _kernels(backend: str):
    impl = BACKENDS[backend]
    if getattr(impl, "NATIVE", False):
        raise ValueError(
            f"fastlm::ffn custom ops: backend {backend!r} runs PyTorch's own ops and autograd, "
            "not the custom ops; expected one of "
            f"{[name for name, b in BACKENDS.items() if not getattr(b, 'NATIVE', False)]}"
        )
    return impl


def _absent(like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: a (0,) tensor stands for "not stored" / "not needed"."""
    return like.new_empty((0,))


def _is_stored(h: torch.Tensor) -> bool:
    """A stored h is (M, N); "not stored" is (0,)."""
    return h.dim() == 2


def _row_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(0, dtype=compute_dtype(t.dtype))


def _grad_as(g: torch.Tensor | None, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A gradient in its input's dtype, or (0,) when it was not needed."""
    return g.to(dtype) if g is not None else _absent(like)


# ------------------------------------------------------------------ linear_gelu


@torch.library.custom_op("fastlm::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str,
    store_pre: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_gelu(x, weight, bias, approximate, store_pre, backend)


def _linear_gelu(x, weight, bias, approximate, store_pre, backend):
    """The forward of fastlm::linear_gelu_fwd, also called directly by eager calls."""
    y, h = _kernels(backend).linear_act(x, weight, bias, approximate, store_pre)
    return y, h if h is not None else _absent(x)


@linear_gelu_fwd.register_fake
def _(x, weight, bias, approximate, store_pre, backend):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, torch.empty_like(y) if store_pre else _absent(x)


@torch.library.custom_op("fastlm::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    approximate: str,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _kernels(backend)
    if not _is_stored(h):
        h = impl.pre_activation(x, weight, bias)
    dh, db = impl.gelu_grad(C.unit_stride_last(dy), h, approximate, need_db)
    if need_db and db is None:
        db = _row_sum(dh)
    dx, dw = impl.linear_grads(dh, x, weight, need_dx, need_dw)
    return (
        _grad_as(dx, x.dtype, x),
        _grad_as(dw, weight.dtype, x),
        _grad_as(db if need_db else None, weight.dtype, x),
    )


@linear_gelu_bwd.register_fake
def _(dy, x, weight, bias, h, approximate, need_dx, need_dw, need_db, backend):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dw = weight.new_empty(weight.shape) if need_dw else None
    db = weight.new_empty((weight.shape[0],)) if need_db else None
    return tuple(g if g is not None else _absent(x) for g in (dx, dw, db))


def _linear_gelu_setup_context(ctx, inputs, output):
    x, weight, bias, approximate, _store_pre, backend = inputs
    ctx.approximate = approximate
    ctx.backend = backend
    ctx.save_for_backward(x, weight, bias, output[1])


def _linear_gelu_backward(ctx, dy, _dh):
    x, weight, bias, h = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and bias is not None
    if dy is None:
        dy = x.new_zeros((x.shape[0], weight.shape[0]))
    dx, dw, db = linear_gelu_bwd(
        dy, x, weight, bias, h, ctx.approximate, need_dx, need_dw, need_db, ctx.backend
    )
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db if need_db else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "fastlm::linear_gelu_fwd", _linear_gelu_backward, setup_context=_linear_gelu_setup_context
)


# ------------------------------------------------------------------ gelu_ffn


@torch.library.custom_op("fastlm::gelu_ffn_fwd", mutates_args=())
def gelu_ffn_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    residual: torch.Tensor | None,
    approximate: str,
    store_pre: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, a = gelu(h1) (the second GEMM's operand, kept for dW2), h1 or (0,))."""
    return _gelu_ffn(x, w1, b1, w2, b2, residual, approximate, store_pre, backend)


def _gelu_ffn(x, w1, b1, w2, b2, residual, approximate, store_pre, backend):
    """The forward of fastlm::gelu_ffn_fwd, also called directly by eager calls."""
    impl = _kernels(backend)
    a, h = impl.linear_act(x, w1, b1, approximate, store_pre)
    out = impl.linear_residual(a, w2, b2, residual)
    return out, a, h if h is not None else _absent(x)


@gelu_ffn_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, approximate, store_pre, backend):
    a = x.new_empty((x.shape[0], w1.shape[0]))
    out = x.new_empty((x.shape[0], w2.shape[0]))
    return out, a, torch.empty_like(a) if store_pre else _absent(x)


@torch.library.custom_op("fastlm::gelu_ffn_bwd", mutates_args=())
def gelu_ffn_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    a: torch.Tensor,
    h: torch.Tensor,
    approximate: str,
    needs: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """needs = (dx, dw1, db1, dw2, db2) -> those gradients, (0,) for the ones not needed."""
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
    impl = _kernels(backend)
    dout = C.unit_stride_last(dout)
    _, dw2 = impl.linear_grads(dout, a, w2, False, need_dw2)
    db2 = _row_sum(dout) if need_db2 else None
    dx = dw1 = db1 = None
    if need_dx or need_dw1 or need_db1:
        if not _is_stored(h):
            h = impl.pre_activation(x, w1, b1)
        dh = impl.matmul_gelu_grad(dout, w2, h, approximate)
        db1 = _row_sum(dh) if need_db1 else None
        dx, dw1 = impl.linear_grads(dh, x, w1, need_dx, need_dw1)
    return (
        _grad_as(dx, x.dtype, x),
        _grad_as(dw1, w1.dtype, x),
        _grad_as(db1, w1.dtype, x),
        _grad_as(dw2, w2.dtype, x),
        _grad_as(db2, w2.dtype, x),
    )


@gelu_ffn_bwd.register_fake
def _(dout, x, w1, b1, w2, a, h, approximate, needs, backend):
    shapes = (x.shape, w1.shape, w1.shape[:1], w2.shape, w2.shape[:1])
    dtypes = (x.dtype, w1.dtype, w1.dtype, w2.dtype, w2.dtype)
    return tuple(
        x.new_empty(shape, dtype=dtype) if need else _absent(x)
        for shape, dtype, need in zip(shapes, dtypes, needs)
    )


def _gelu_ffn_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, _residual, approximate, _store_pre, backend = inputs
    _, a, h = output
    ctx.approximate = approximate
    ctx.backend = backend
    ctx.has_b2 = b2 is not None
    ctx.save_for_backward(x, w1, b1, w2, a, h)


def _gelu_ffn_backward(ctx, dout, _da, _dh):
    x, w1, b1, w2, a, h = ctx.saved_tensors
    ng = ctx.needs_input_grad
    needs = [ng[0], ng[1], ng[2] and b1 is not None, ng[3], ng[4] and ctx.has_b2]
    if dout is None:
        dout = x.new_zeros((x.shape[0], w2.shape[0]))
    grads = gelu_ffn_bwd(dout, x, w1, b1, w2, a, h, ctx.approximate, needs, ctx.backend)
    grads = [g if need else None for g, need in zip(grads, needs)]
    d_residual = dout if ng[5] else None
    return (*grads, d_residual, None, None, None)


torch.library.register_autograd(
    "fastlm::gelu_ffn_fwd", _gelu_ffn_backward, setup_context=_gelu_ffn_setup_context
)


# ------------------------------------------------------------------ entry point


def _needs_backward(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., K) as (M, K): a view unless the leading dims cannot collapse. Spelled with
    the row count because K may be 0 here (in_features 0 is valid; -1 would be ambiguous)."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def run(call, backend: str) -> torch.Tensor:
    """The result of ``call`` (an FFNCall) on a kernel backend, shaped like the call's
    output."""
    x2 = _rows(call.x)
    # h (h1) is only needed for the gradients that flow through the GELU: x, w1, b1.
    store_pre = _needs_backward(call.x, call.w1, call.b1)
    # Eager calls without autograd skip the custom ops (fastlm.ops._eager).
    eager = _eager.direct(call.x, call.w1, call.b1, call.w2, call.b2, call.residual)
    if call.w2 is None:
        fwd = _linear_gelu if eager else linear_gelu_fwd
        y, _ = fwd(x2, call.w1, call.b1, call.approximate, store_pre, backend)
    else:
        r2 = _rows(call.residual) if call.residual is not None else None
        fwd = _gelu_ffn if eager else gelu_ffn_fwd
        y, _, _ = fwd(
            x2, call.w1, call.b1, call.w2, call.b2, r2, call.approximate, store_pre, backend
        )
    return y.view(call.out_shape)
