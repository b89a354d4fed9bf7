"""linear_gelu / gelu_ffn by fastlm.reference, computed in fp32 (fp64 for fp64): the oracle,
served only when asked for by name (``backend="reference"``), for debugging a kernel
against it. It runs through the same custom ops as the kernels, so it also checks their
chain rule and pre-activation handling."""

from __future__ import annotations

from fastlm.reference import ffn as ref
from fastlm.reference._util import compute_dtype


def reason(call) -> str | None:
    return None


def linear_act(x, w, b, approximate, store_pre):
    h = ref.linear(x, w, b)  # compute dtype
    return ref.gelu(h, approximate).to(x.dtype), (h.to(x.dtype) if store_pre else None)


def linear_residual(a, w, b, residual):
    out = ref.linear(a, w, b)
    if residual is not None:
        out = out + residual.to(out.dtype)
    return out.to(a.dtype)


def pre_activation(x, w, b):
    return ref.linear(x, w, b).to(x.dtype)


def gelu_grad(dy, h, approximate, need_db):
    """(dh in the compute dtype, None): the op sums db."""
    return ref.gelu_backward(dy, h, approximate), None


def matmul_gelu_grad(dy, w, h, approximate):
    ct = compute_dtype(dy.dtype)
    return ref.gelu_backward(dy.to(ct) @ w.to(ct), h, approximate)


def linear_grads(dh, x, w, need_dx, need_dw):
    dx, dw, _ = ref.linear_backward(dh, x, w, need_dx, need_dw, False)
    return dx, dw
