"""fastlm.layer_norm: LayerNorm over the last dim with an optional fused residual add.

    layer_norm(x, weight, bias, eps)                 -> y = LN(x)
    layer_norm(x, weight, bias, eps, residual=r)     -> (y, z) with z = x + r, y = LN(z)

The residual form is the pre-LN transformer block step: the residual stream z is carried
on and its LayerNorm goes into the next sublayer, in one pass over memory.
"""

from __future__ import annotations

import torch

from fastlm import backends
from fastlm.ops import _checks as C
from fastlm.reference import layer_norm as ref

OP = "layer_norm"
TRITON_MAX_N = 16384


# ------------------------------------------------------------------ implementations


def _fwd_impl(x, weight, bias, residual, eps, backend):
    if backend == "triton":
        from fastlm.kernels.layer_norm import layer_norm_fwd

        y, z, mean, rstd = layer_norm_fwd(x, residual, weight, bias, eps, store_z=True)
    elif backend == "cuda":
        from fastlm import _cuda_ext

        y, z, mean, rstd = _cuda_ext.module().layer_norm_fwd(x, residual, weight, bias, eps)
    else:
        out = ref.layer_norm(x, weight, bias, eps, residual)
        y, z = out if residual is not None else (out, None)
        mean, rstd = ref.layer_norm_stats(z if z is not None else x, eps)
        mean, rstd = mean.float(), rstd.float()
    if z is None:
        z = x.new_empty((0,))
    return y, z, mean, rstd


def _bwd_impl(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db, backend):
    if backend == "triton":
        from fastlm.kernels.layer_norm import layer_norm_bwd

        dz, dw, db = layer_norm_bwd(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db, z.dtype)
    elif backend == "cuda":
        from fastlm import _cuda_ext

        dz, dw, db = _cuda_ext.module().layer_norm_bwd(
            dy, dz_extra, z, weight, mean, rstd, need_dw, need_db
        )
    else:
        dz, dw, _ = ref.layer_norm_backward(dy, z, weight, None, mean, rstd, dz_extra)
        dw = dw.float() if need_dw else None
        db = dy.float().sum(0) if need_db else None

    def empty():
        return z.new_empty((0,), dtype=torch.float32)

    return dz, dw if need_dw else empty(), db if need_db else empty()


# ------------------------------------------------------------------ custom ops


@torch.library.custom_op("fastlm::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(x, weight, bias, residual, eps, backend)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, backend):
    m = x.shape[0]
    z = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    stats = x.new_empty((m,), dtype=torch.float32)
    return torch.empty_like(x), z, stats, torch.empty_like(stats)


@torch.library.custom_op("fastlm::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: torch.Tensor,
    dz_extra: torch.Tensor | None,
    z: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_dw: bool,
    need_db: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db, backend)


@_layer_norm_bwd.register_fake
def _(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db, backend):
    n = z.shape[-1]
    dw = z.new_empty((n if need_dw else 0,), dtype=torch.float32)
    db = z.new_empty((n if need_db else 0,), dtype=torch.float32)
    return torch.empty_like(z), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _eps, backend = inputs
    _, z, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.backend = backend
    ctx.save_for_backward(z if residual is not None else x, weight, bias, mean, rstd)


def _backward(ctx, dy, dz_out, dmean, drstd):
    z, weight, bias, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    dz_extra = dz_out if ctx.has_residual and dz_out is not None and dz_out.numel() else None
    if dy is None:
        dy = torch.zeros_like(z)
    dy, dz_extra = C.unit_stride_last(dy), C.unit_stride_last(dz_extra)
    dz, dw, db = _layer_norm_bwd(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db, ctx.backend)
    dw = dw.to(weight.dtype) if need_dw else None
    db = db.to(bias.dtype) if need_db else None
    return dz, dw, db, dz if ctx.has_residual else None, None, None


torch.library.register_autograd("fastlm::layer_norm_fwd", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API


def _validate(x, weight, bias, eps, residual):
    C.check_tensor(OP, "x", x)
    C.check_float(OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"fastlm.{OP}: x must have at least 1 dimension, got a 0-d tensor")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(
            f"fastlm.{OP}: the normalized (last) dimension of x is empty, shape {tuple(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            C.check_tensor(OP, name, t)
            C.check_shape(OP, name, t, (n,))
    if residual is not None:
        C.check_tensor(OP, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"fastlm.{OP}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
    C.check_same_device(OP, "x", x, weight=weight, bias=bias, residual=residual)
    C.check_same_dtype(OP, "x", x, residual=residual)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            C.check_float(OP, name, t)
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None:
            C.check_last_dim_contiguous(OP, name, t)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"fastlm.{OP}: eps must be a non-negative float, got {eps!r}")


def _limits(n: int, x: torch.Tensor):
    def limit(backend: str) -> str | None:
        if backend == "triton" and n > TRITON_MAX_N:
            return f"hidden size {n} exceeds the Triton kernel's limit of {TRITON_MAX_N}"
        if backend == "cuda":
            from fastlm import _cuda_ext

            return _cuda_ext.op_reason(OP, x=x, n=n)
        return None

    return limit


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of ``x`` (..., N), statistics in fp32.

    Returns ``y``, or ``(y, x + residual)`` when ``residual`` (same shape as x) is given.
    ``weight`` and ``bias`` are (N,) or None. fp16, bf16 and fp32 inputs.
    """
    _validate(x, weight, bias, eps, residual)
    n = x.shape[-1]
    chosen = backends.choose(OP, x.device, backend, _limits(n, x))
    shape = x.shape
    x2 = C.as_rows(x)
    r2 = C.as_rows(residual) if residual is not None else None
    y, z, _, _ = _layer_norm_fwd(x2, weight, bias, r2, float(eps), chosen)
    if residual is None:
        return y.view(shape)
    return y.view(shape), z.view(shape)
