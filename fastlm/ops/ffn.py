"""fastlm.linear_gelu and fastlm.gelu_ffn: the bias+GELU feed-forward with fused epilogues.

    linear_gelu(x, W, b)                    y   = gelu(x W^T + b)
    gelu_ffn(x, W1, b1, W2, b2, residual=r) out = gelu(x W1^T + b1) W2^T + b2 + r

On the triton backend every forward GEMM is one kernel with its bias, GELU and residual add
in the epilogue (fastlm.kernels.linear_gelu), so the (M, N) pre-activation never makes an
extra round trip through memory.

Backward: recompute or store the pre-activation h = x W^T + b? Recomputing h costs a whole
GEMM (2 M N K flops); storing it costs one extra (M, N) write in the forward epilogue, while
the tile is still in registers, and one read in the backward. Storing wins by far, so the
forward stores h exactly when a backward can follow (grad mode on and an input requires
grad) and skips the write for inference. (Should h be missing anyway, the backward
recomputes it rather than fail.) Then:

* linear_gelu: dh = dy * gelu'(h) in one elementwise Triton pass that also sums db over rows;
  dx = dh W and dW = dh^T x are plain GEMMs with nothing left to fuse, so they go to
  torch.matmul (cuBLAS on the GPU: transposed operands are free there, no copies, and it
  is the speed target anyway).
* gelu_ffn: dh1 = (dout W2) * gelu'(h1) is a GEMM whose epilogue multiplies by gelu'(h1)
  (the fused kernel's ACT_GRAD mode), saving the write and re-read of dout W2. dW2, dW1 and
  dx are plain cuBLAS GEMMs; db2 and db1 are row sums.

The cuda backend is cuBLAS GEMM + the hand-written vectorised epilogue kernels of csrc/
(fastlm._cuda_ext): every GEMM is torch.matmul / torch.addmm (cuBLAS), and what the triton
backend fuses into the GEMM runs as one elementwise pass over the GEMM's output instead:

* forward:  g = x W1^T (cuBLAS), then ``bias_gelu`` computes h = g + b1, gelu(h) and, when
  a backward can follow, stores h, in one pass; gelu_ffn's second GEMM is followed by
  ``bias_residual_add`` (out = g2 + b2 + residual, one rounding) when there is a residual,
  and is a single cuBLAS addmm (bias inside the GEMM) when there is not.
* backward: dh = dy * gelu'(h) by ``gelu_bwd`` (for gelu_ffn, dy = dout W2 from cuBLAS);
  db = row sums; dx and dW are the same cuBLAS GEMMs as on the triton backend.

The cuda backend rounds the GEMM result to the activation dtype before the bias is added
(one rounding more than the fused Triton epilogue); the parity rule absorbs it.

The torch backend is fastlm.reference, computed in fp32.
"""

from __future__ import annotations

import math

import torch

from fastlm import backends
from fastlm.ops import _checks as C
from fastlm.reference import ffn as ref
from fastlm.reference._util import compute_dtype

OP_LINEAR_GELU = "linear_gelu"
OP_GELU_FFN = "gelu_ffn"
APPROXIMATIONS = ("none", "tanh")
# Kernel activation name for each torch.nn.functional.gelu ``approximate`` value.
_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


# ------------------------------------------------------------------ implementations


def _cuda_kernels():
    from fastlm import _cuda_ext

    return _cuda_ext.module()


def _pre_activation(x, weight, bias, backend):
    """h = x W^T + b in x's dtype (the backward's fallback when h was not stored)."""
    if backend == "triton":
        from fastlm.kernels.linear_gelu import fused_matmul

        return fused_matmul(x, weight.t(), bias=bias)[0]
    if backend == "cuda":
        # Rounded like the forward's stored h: the GEMM result in x's dtype, then + b.
        g = torch.matmul(x, weight.t())
        return g if bias is None else g.add_(bias)
    return ref.linear(x, weight, bias).to(x.dtype)


def _has_pre_activation(h: torch.Tensor) -> bool:
    """The forward stores h as (M, N); when no backward was expected it returned (0,)."""
    return h.dim() == 2


def _cuda_linear_gelu(x, weight, bias, approximate, store_pre):
    """(gelu(x W^T + b), h = x W^T + b or None): cuBLAS GEMM, then the bias_gelu epilogue."""
    return _cuda_kernels().bias_gelu(torch.matmul(x, weight.t()), bias, approximate, store_pre)


def _lg_fwd_impl(x, weight, bias, approximate, store_pre, backend):
    if backend == "triton":
        from fastlm.kernels.linear_gelu import fused_matmul

        y, h = fused_matmul(
            x, weight.t(), bias=bias, activation=_ACTIVATION[approximate], store_pre=store_pre
        )
    elif backend == "cuda":
        y, h = _cuda_linear_gelu(x, weight, bias, approximate, store_pre)
    else:
        hc = ref.linear(x, weight, bias)
        y = ref.gelu(hc, approximate).to(x.dtype)
        h = hc.to(x.dtype) if store_pre else None
    return y, h if h is not None else _empty(x)


def _gelu_backward(dy, h, approximate, need_db, backend):
    """(dh, db): dh = dy * gelu'(h); in x's dtype on triton, compute dtype on torch."""
    if backend == "triton":
        from fastlm.kernels.linear_gelu import gelu_bwd

        if dy.stride(-1) != 1:  # e.g. an expanded gradient: the kernel reads rows densely
            dy = dy.contiguous()
        return gelu_bwd(dy, h, _ACTIVATION[approximate], need_db)
    if backend == "cuda":
        # The kernel takes any row stride but needs a unit last-dim stride (an expanded
        # gradient has stride 0 there).
        dh = _cuda_kernels().gelu_bwd(C.unit_stride_last(dy), h, approximate)
        return dh, dh.sum(0, dtype=torch.float32) if need_db else None
    ct = compute_dtype(h.dtype)
    dh = dy.to(ct) * ref.gelu_grad(h.to(ct), approximate)
    return dh, dh.sum(0) if need_db else None


def _lg_bwd_impl(dy, x, weight, bias, h, approximate, need_dx, need_dw, need_db, backend):
    if not _has_pre_activation(h):
        h = _pre_activation(x, weight, bias, backend)
    dh, db = _gelu_backward(dy, h, approximate, need_db, backend)
    if backend in ("triton", "cuda"):
        dx = torch.matmul(dh, weight) if need_dx else None
        dw = torch.matmul(dh.t(), x) if need_dw else None
    else:
        dx, dw, _ = ref.linear_backward(dh, x, weight, need_dx, need_dw, False)
    return (
        dx.to(x.dtype) if need_dx else _empty(x),
        dw.to(weight.dtype) if need_dw else _empty(x),
        db.to(weight.dtype) if need_db else _empty(x),
    )


def _ffn_fwd_impl(x, w1, b1, w2, b2, residual, approximate, store_pre, backend):
    if backend == "triton":
        from fastlm.kernels.linear_gelu import fused_matmul

        a, h = fused_matmul(
            x, w1.t(), bias=b1, activation=_ACTIVATION[approximate], store_pre=store_pre
        )
        out, _ = fused_matmul(a, w2.t(), bias=b2, residual=residual)
    elif backend == "cuda":
        a, h = _cuda_linear_gelu(x, w1, b1, approximate, store_pre)
        if residual is not None:
            out = _cuda_kernels().bias_residual_add(torch.matmul(a, w2.t()), b2, residual)
        elif b2 is not None:
            out = torch.addmm(b2, a, w2.t())  # cuBLAS adds the bias itself: nothing to fuse
        else:
            out = torch.matmul(a, w2.t())
    else:
        hc = ref.linear(x, w1, b1)
        a = ref.gelu(hc, approximate).to(x.dtype)
        h = hc.to(x.dtype) if store_pre else None
        outc = ref.linear(a, w2, b2)
        if residual is not None:
            outc = outc + residual.to(outc.dtype)
        out = outc.to(x.dtype)
    return out, a, h if h is not None else _empty(x)


def _ffn_bwd_impl(dout, x, w1, b1, w2, a, h, approximate, needs, backend):
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
    dt = x.dtype
    ct = compute_dtype(dt)
    need_dh = need_dx or need_dw1 or need_db1
    if need_dh and not _has_pre_activation(h):
        h = _pre_activation(x, w1, b1, backend)
    dx = dw1 = db1 = dw2 = db2 = None
    if backend in ("triton", "cuda"):
        if need_db2:
            db2 = dout.sum(0, dtype=torch.float32)
        if need_dw2:
            dw2 = torch.matmul(dout.t(), a)
        if need_dh:
            if backend == "triton":
                from fastlm.kernels.linear_gelu import fused_matmul

                act = _ACTIVATION[approximate]
                dh, _ = fused_matmul(dout, w2, activation=act, act_grad_of=h)
            else:  # cuBLAS da = dout W2, then the gelu_bwd epilogue
                dh = _cuda_kernels().gelu_bwd(torch.matmul(dout, w2), h, approximate)
            db1 = dh.sum(0, dtype=torch.float32) if need_db1 else None
            dw1 = torch.matmul(dh.t(), x) if need_dw1 else None
            dx = torch.matmul(dh, w1) if need_dx else None
    else:
        da, dw2, db2 = ref.linear_backward(dout, a, w2, need_dh, need_dw2, need_db2)
        if need_dh:
            dh = da * ref.gelu_grad(h.to(ct), approximate)
            dx, dw1, db1 = ref.linear_backward(dh, x, w1, need_dx, need_dw1, need_db1)
    return tuple(g.to(dt) if g is not None else _empty(x) for g in (dx, dw1, db1, dw2, db2))


# ------------------------------------------------------------------ custom ops: linear_gelu


@torch.library.custom_op("fastlm::linear_gelu_fwd", mutates_args=())
def _linear_gelu_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str,
    store_pre: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _lg_fwd_impl(x, weight, bias, approximate, store_pre, backend)


@_linear_gelu_fwd.register_fake
def _(x, weight, bias, approximate, store_pre, backend):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, torch.empty_like(y) if store_pre else _empty(x)


@torch.library.custom_op("fastlm::linear_gelu_bwd", mutates_args=())
def _linear_gelu_bwd(
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
    return _lg_bwd_impl(dy, x, weight, bias, h, approximate, need_dx, need_dw, need_db, backend)


@_linear_gelu_bwd.register_fake
def _(dy, x, weight, bias, h, approximate, need_dx, need_dw, need_db, backend):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else _empty(x)
    dw = weight.new_empty(weight.shape) if need_dw else _empty(x)
    db = weight.new_empty((weight.shape[0],)) if need_db else _empty(x)
    return dx, dw, db


def _lg_setup_context(ctx, inputs, output):
    x, weight, bias, approximate, _store_pre, backend = inputs
    ctx.approximate = approximate
    ctx.backend = backend
    ctx.save_for_backward(x, weight, bias, output[1])


def _lg_backward(ctx, dy, dh_unused):
    x, weight, bias, h = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and bias is not None
    if dy is None:
        dy = x.new_zeros((x.shape[0], weight.shape[0]))
    dx, dw, db = _linear_gelu_bwd(
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
    "fastlm::linear_gelu_fwd", _lg_backward, setup_context=_lg_setup_context
)


# ------------------------------------------------------------------ custom ops: gelu_ffn


@torch.library.custom_op("fastlm::gelu_ffn_fwd", mutates_args=())
def _gelu_ffn_fwd(
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
    return _ffn_fwd_impl(x, w1, b1, w2, b2, residual, approximate, store_pre, backend)


@_gelu_ffn_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, approximate, store_pre, backend):
    a = x.new_empty((x.shape[0], w1.shape[0]))
    out = x.new_empty((x.shape[0], w2.shape[0]))
    return out, a, torch.empty_like(a) if store_pre else _empty(x)


@torch.library.custom_op("fastlm::gelu_ffn_bwd", mutates_args=())
def _gelu_ffn_bwd(
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
    return _ffn_bwd_impl(dout, x, w1, b1, w2, a, h, approximate, needs, backend)


@_gelu_ffn_bwd.register_fake
def _(dout, x, w1, b1, w2, a, h, approximate, needs, backend):
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else _empty(x),
        w1.new_empty(w1.shape) if need_dw1 else _empty(x),
        w1.new_empty((w1.shape[0],)) if need_db1 else _empty(x),
        w2.new_empty(w2.shape) if need_dw2 else _empty(x),
        w2.new_empty((w2.shape[0],)) if need_db2 else _empty(x),
    )


def _ffn_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, _residual, approximate, _store_pre, backend = inputs
    _, a, h = output
    ctx.approximate = approximate
    ctx.backend = backend
    ctx.has_b1 = b1 is not None
    ctx.has_b2 = b2 is not None
    ctx.save_for_backward(x, w1, b1, w2, a, h)


def _ffn_backward(ctx, dout, da_unused, dh_unused):
    x, w1, b1, w2, a, h = ctx.saved_tensors
    ng = ctx.needs_input_grad
    needs = [ng[0], ng[1], ng[2] and ctx.has_b1, ng[3], ng[4] and ctx.has_b2]
    if dout is None:
        dout = x.new_zeros((x.shape[0], w2.shape[0]))
    grads = _gelu_ffn_bwd(dout, x, w1, b1, w2, a, h, ctx.approximate, needs, ctx.backend)
    grads = [g if need else None for g, need in zip(grads, needs)]
    d_residual = dout if ng[5] else None
    return (*grads, d_residual, None, None, None)


torch.library.register_autograd(
    "fastlm::gelu_ffn_fwd", _ffn_backward, setup_context=_ffn_setup_context
)


# ------------------------------------------------------------------ validation


def _check_input(op: str, x, approximate) -> None:
    C.check_tensor(op, "x", x)
    C.check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(
            f"fastlm.{op}: x must have at least 1 dimension (..., in_features), got a 0-d tensor"
        )
    C.check_last_dim_contiguous(op, "x", x)
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(
            f"fastlm.{op}: approximate must be one of {APPROXIMATIONS}, got {approximate!r}"
        )


def _check_linear(
    op: str, x_name: str, in_features: int, w_name: str, weight, b_name: str, bias
) -> int:
    """Checks a (weight, bias) pair applied to ``in_features`` inputs; returns out_features."""
    C.check_tensor(op, w_name, weight)
    if weight.dim() != 2:
        raise ValueError(
            f"fastlm.{op}: {w_name} must be 2-D (out_features, in_features) like torch.nn.Linear.weight, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != in_features:
        raise ValueError(
            f"fastlm.{op}: {w_name} has in_features {weight.shape[1]} (shape {tuple(weight.shape)}) but "
            f"{x_name} has {in_features} features; expected {w_name} of shape (*, {in_features})"
        )
    out_features = weight.shape[0]
    if bias is not None:
        C.check_tensor(op, b_name, bias)
        if bias.dim() != 1 or bias.shape[0] != out_features:
            raise ValueError(
                f"fastlm.{op}: {b_name} must have shape ({out_features},) to match {w_name} "
                f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
        C.check_last_dim_contiguous(op, b_name, bias)
    return out_features


def _check_dtypes_devices(op: str, x, **others) -> None:
    for name, t in others.items():
        if t is not None:
            C.check_float(op, name, t)
    C.check_same_dtype(op, "x", x, **others)
    C.check_same_device(op, "x", x, **others)


def _limits(op: str, x: torch.Tensor, approximate: str):
    def limit(backend: str) -> str | None:
        if backend == "cuda":
            from fastlm import _cuda_ext

            return _cuda_ext.op_reason(op, x=x, approximate=approximate)
        return None

    return limit


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as (M, K); a view unless the leading dims cannot collapse (works for K = 0)."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _needs_backward(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ------------------------------------------------------------------ public API


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    approximate: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """y = gelu(x @ weight.T + bias), the bias and GELU fused into the GEMM.

    x: (..., K) with a contiguous last dim; weight: (N, K) as torch.nn.Linear, any strides
    (a transposed view such as GPT-2's Conv1D ``weight.t()`` is read in place); bias: (N,) or
    None. ``approximate``: "none" (exact erf GELU, BERT) or "tanh" (GPT-2's gelu_new).
    fp16, bf16, fp32 (true fp32 unless TF32 is enabled in torch), fp32 accumulation.
    Returns (..., N) in x's dtype. Differentiable in x, weight and bias.
    """
    op = OP_LINEAR_GELU
    _check_input(op, x, approximate)
    _check_linear(op, "x", x.shape[-1], "weight", weight, "bias", bias)
    _check_dtypes_devices(op, x, weight=weight, bias=bias)
    chosen = backends.choose(op, x.device, backend, _limits(op, x, approximate))
    store_pre = _needs_backward(x, weight, bias)
    y, _ = _linear_gelu_fwd(_rows(x), weight, bias, approximate, store_pre, chosen)
    return y.view(*x.shape[:-1], weight.shape[0])


def gelu_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    approximate: str = "none",
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """out = gelu(x @ w1.T + b1) @ w2.T + b2 (+ residual): the transformer MLP in two fused GEMMs.

    x: (..., H) with a contiguous last dim; w1: (I, H), b1: (I,) or None; w2: (H_out, I),
    b2: (H_out,) or None (weights as torch.nn.Linear, any strides); residual: (..., H_out) or
    None, added in the second GEMM's epilogue (BERT's output.dense(...) + input_tensor).
    Returns (..., H_out) in x's dtype. Differentiable in every tensor argument.
    """
    op = OP_GELU_FFN
    _check_input(op, x, approximate)
    inter = _check_linear(op, "x", x.shape[-1], "w1", w1, "b1", b1)
    out_features = _check_linear(op, "the intermediate activation", inter, "w2", w2, "b2", b2)
    out_shape = (*x.shape[:-1], out_features)
    if residual is not None:
        C.check_tensor(op, "residual", residual)
        if tuple(residual.shape) != out_shape:
            raise ValueError(
                f"fastlm.{op}: residual must have the output's shape {out_shape}, got {tuple(residual.shape)}"
            )
        C.check_last_dim_contiguous(op, "residual", residual)
    _check_dtypes_devices(op, x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    chosen = backends.choose(op, x.device, backend, _limits(op, x, approximate))
    # h1 is only needed for the gradients that flow through the GELU (x, w1, b1).
    store_pre = _needs_backward(x, w1, b1)
    r2 = _rows(residual) if residual is not None else None
    out, _, _ = _gelu_ffn_fwd(_rows(x), w1, b1, w2, b2, r2, approximate, store_pre, chosen)
    return out.view(out_shape)
