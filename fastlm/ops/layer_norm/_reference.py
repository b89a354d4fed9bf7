"""LayerNorm by fastlm.reference (fp32 internally, fp64 for fp64): the oracle, served only
when asked for by name (``backend="reference"``), for debugging a kernel against it."""

from __future__ import annotations

from fastlm.reference import layer_norm as ref


def reason(call) -> str | None:
    return None


def forward(x, residual, weight, bias, eps):
    """x, residual (M, N) -> (y, z = x + residual or None, mean, rstd)."""
    out = ref.layer_norm(x, weight, bias, eps, residual)
    y, z = out if residual is not None else (out, None)
    mean, rstd = ref.layer_norm_stats(z if z is not None else x, eps)
    return y, z, mean.float(), rstd.float()


def backward(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db):
    """-> (dz, dweight fp32 or None, dbias fp32 or None)."""
    dz, dw, _ = ref.layer_norm_backward(dy, z, weight, None, mean, rstd, dz_extra)
    dw = dw.float() if need_dw else None
    db = dy.float().sum(0) if need_db else None
    return dz, dw, db
