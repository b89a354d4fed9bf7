"""LayerNorm on the CUDA C++ kernels of csrc/layer_norm.cu (through fastlm._cuda_ext)."""

from __future__ import annotations

from fastlm import _cuda_ext


def reason(call) -> str | None:
    if call.device.type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors, got device {call.device.type!r}"
    if call.n > _cuda_ext.LAYER_NORM_MAX_N:
        return (
            f"hidden size {call.n} exceeds the CUDA kernel's limit of {_cuda_ext.LAYER_NORM_MAX_N}"
        )
    return _cuda_ext.unavailable_reason()


def forward(x, residual, weight, bias, eps):
    """x, residual (M, N) -> (y, z = x + residual or None, mean, rstd)."""
    return _cuda_ext.module().layer_norm_fwd(x, residual, weight, bias, eps)


def backward(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db):
    """-> (dz, dweight fp32 or None, dbias fp32 or None)."""
    return _cuda_ext.module().layer_norm_bwd(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db)
