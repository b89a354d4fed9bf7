"""LayerNorm on the Triton kernels of fastlm.kernels.layer_norm (one pass forward, fp32
statistics; backward with a banded two-stage dweight/dbias reduction)."""

from __future__ import annotations

from fastlm.kernels.limits import LAYER_NORM_MAX_N


def reason(call) -> str | None:
    if call.n > LAYER_NORM_MAX_N:
        return f"hidden size {call.n} exceeds the Triton kernel's limit of {LAYER_NORM_MAX_N}"
    return None


def forward(x, residual, weight, bias, eps):
    """x, residual (M, N) -> (y, z = x + residual or None, mean, rstd)."""
    from fastlm.kernels.layer_norm import layer_norm_fwd

    return layer_norm_fwd(x, residual, weight, bias, eps, store_z=True)


def backward(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db):
    """-> (dz, dweight fp32 or None, dbias fp32 or None)."""
    from fastlm.kernels.layer_norm import layer_norm_bwd

    return layer_norm_bwd(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db, z.dtype)
