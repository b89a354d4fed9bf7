"""The custom ops behind fastlm.layer_norm for the kernel backends (triton, cuda, reference):
``fastlm::layer_norm_fwd`` / ``fastlm::layer_norm_bwd`` with their fake (meta) versions and
the autograd formula, so the op composes with autograd and torch.compile(fullgraph=True).

Operands are 2-D rows (M, N) (the public function flattens the leading dims). The forward
returns (y, z, mean, rstd): z = x + residual when there is a residual (an empty tensor
otherwise; custom ops cannot return None), and the fp32 row statistics the backward reuses.
"""

from __future__ import annotations

import torch

from fastlm.ops import _checks as C
from fastlm.ops import _eager
from fastlm.ops.layer_norm import _cuda, _reference, _torch, _triton

BACKENDS = {"triton": _triton, "cuda": _cuda, "torch": _torch, "reference": _reference}


@torch.library.custom_op("fastlm::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, z, mean, rstd = BACKENDS[backend].forward(x, residual, weight, bias, eps)
    return y, (z if z is not None else x.new_empty((0,))), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, backend):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    z = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x), z, stats, torch.empty_like(stats)


@torch.library.custom_op("fastlm::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
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
    dz, dw, db = BACKENDS[backend].backward(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db)
    # Custom ops return tensors, each its own (no aliasing): an empty one = "not needed".
    dw = dw if need_dw else z.new_empty((0,), dtype=torch.float32)
    db = db if need_db else z.new_empty((0,), dtype=torch.float32)
    return dz, dw, db


@layer_norm_bwd.register_fake
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


def _backward(ctx, dy, dz_out, _dmean, _drstd):
    """dz = LN'(z)^T dy (+ dz_out, the gradient reaching z = x + residual directly); dz
    flows to both x and residual. dweight/dbias are reduced in fp32 and cast once."""
    z, weight, bias, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    dz_extra = dz_out if ctx.has_residual and dz_out is not None and dz_out.numel() else None
    if dy is None:
        dy = torch.zeros_like(z)
    dy, dz_extra = C.unit_stride_last(dy), C.unit_stride_last(dz_extra)
    dz, dw, db = layer_norm_bwd(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db, ctx.backend)
    dw = dw.to(weight.dtype) if need_dw else None
    db = db.to(bias.dtype) if need_db else None
    return dz, dw, db, dz if ctx.has_residual else None, None, None


torch.library.register_autograd("fastlm::layer_norm_fwd", _backward, setup_context=_setup_context)


def run(call, backend: str):
    """The result of ``call`` on a kernel backend: y, or (y, x + residual). Eager calls
    without autograd skip the custom op (fastlm.ops._eager)."""
    shape = call.x.shape
    x2 = C.as_rows(call.x)
    r2 = C.as_rows(call.residual) if call.residual is not None else None
    if _eager.direct(call.x, call.weight, call.bias, call.residual):
        y, z, _, _ = BACKENDS[backend].forward(x2, r2, call.weight, call.bias, call.eps)
    else:
        y, z, _, _ = layer_norm_fwd(x2, call.weight, call.bias, r2, call.eps, backend)
    if call.residual is None:
        return y.view(shape)
    return y.view(shape), z.view(shape)
