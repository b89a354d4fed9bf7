"""fastlm.layer_norm: LayerNorm over the last dim with an optional fused residual add.

    layer_norm(x, weight, bias, eps)                 -> y = LN(x)
    layer_norm(x, weight, bias, eps, residual=r)     -> (y, z) with z = x + r, y = LN(z)

    mean = mean(z, -1),  rstd = 1 / sqrt(var(z, -1, biased) + eps)
    y = (z - mean) * rstd * weight + bias

The residual form is the pre-LN transformer block step: the residual stream z is carried
on and its LayerNorm goes into the next sublayer, in one pass over memory.

Layout of this folder (the same for every op):
    call.py        the call record and all argument checks
    _op.py         the custom ops (fake + autograd) that run the kernel backends
    _triton.py _cuda.py _torch.py _reference.py   one file per backend, each with
                   reason(call) -> str | None (all its limits) and its implementation
"""

from __future__ import annotations

import torch

from fastlm import backends
from fastlm.ops import _autocast
from fastlm.ops.layer_norm._op import BACKENDS, run
from fastlm.ops.layer_norm.call import OP, LayerNormCall

__all__ = ["BACKENDS", "OP", "LayerNormCall", "layer_norm"]


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
    ``weight`` and ``bias`` are (N,) or None. fp16, bf16 and fp32 inputs; any strides with a
    contiguous last dim.
    """
    if _autocast.dtype_for(x) is not None:
        with _autocast.disabled(x.device):
            dtype = _autocast.norm_dtype(x.device, x, residual)
            x, weight, bias, residual = _autocast.cast(dtype, x, weight, bias, residual)
            return layer_norm(x, weight, bias, eps, residual=residual, backend=backend)
    call = LayerNormCall.checked(x, weight, bias, eps, residual)
    chosen = backends.choose(OP, call, BACKENDS, backend)
    native = _NATIVE_RUNS.get(chosen)
    if native is not None:
        return native(call)
    return run(call, chosen)


_NATIVE_RUNS = backends.native_runs(BACKENDS)
