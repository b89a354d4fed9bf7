"""linear_gelu / gelu_ffn on cuBLAS GEMMs plus the vectorised epilogue kernels of
csrc/bias_act.cu (through fastlm._cuda_ext).

Every GEMM is torch.matmul / torch.addmm (cuBLAS); what the triton backend fuses into the
GEMM runs here as one elementwise pass over the GEMM's output instead:

* forward: g = x W1^T (cuBLAS), then ``bias_gelu`` computes h = g + b1 and gelu(h) and, when a
  backward can follow, stores h, in one pass. gelu_ffn's second GEMM is followed by
  ``bias_residual_add`` (out = g2 + b2 + residual, one rounding) when there is a residual,
  and is a single cuBLAS addmm (the bias inside the GEMM) when there is not.
* backward: dh = dy * gelu'(h) by ``gelu_bwd`` (for gelu_ffn, dy = dout W2 from cuBLAS);
  the op sums db over rows; dx and dW are the same cuBLAS GEMMs as on the triton backend
  (fastlm/ops/ffn/_cublas.py).

The GEMM result is rounded to the activation dtype before the bias is added (one rounding
more than the fused Triton epilogue); the parity rule absorbs it.
"""

from __future__ import annotations

import torch

from fastlm import _cuda_ext

# The plain dx / dW GEMMs are cuBLAS's on this backend too.
from fastlm.ops.ffn._cublas import linear_grads as linear_grads

# The GELU forms csrc/bias_act.cu implements (its binding rejects any other).
_APPROXIMATIONS = ("none", "tanh")


def reason(call) -> str | None:
    """The epilogue kernels take any row stride and alignment (they pick their 16-byte
    vector path at run time) and every float dtype; what remains is the device, the GELU
    form, and whether the extension is built."""
    if call.device.type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors, got device {call.device.type!r}"
    if call.approximate not in _APPROXIMATIONS:
        return (
            f"the CUDA GELU kernels implement approximate {_APPROXIMATIONS}, "
            f"got {call.approximate!r}"
        )
    return _cuda_ext.unavailable_reason()


def linear_act(x, w, b, approximate, store_pre):
    """(gelu(x w^T + b), h or None): cuBLAS GEMM, then the bias_gelu epilogue pass."""
    return _cuda_ext.module().bias_gelu(torch.matmul(x, w.t()), b, approximate, store_pre)


def linear_residual(a, w, b, residual):
    if residual is not None:
        return _cuda_ext.module().bias_residual_add(torch.matmul(a, w.t()), b, residual)
    if b is not None:
        return torch.addmm(b, a, w.t())  # cuBLAS adds the bias itself: nothing to fuse
    return torch.matmul(a, w.t())


def pre_activation(x, w, b):
    """h rounded like the forward's stored one: the GEMM result in x's dtype, then + b."""
    g = torch.matmul(x, w.t())
    return g if b is None else g.add_(b)


def gelu_grad(dy, h, approximate, need_db):
    """(dh = dy * gelu'(h), None): the op sums db."""
    return _cuda_ext.module().gelu_bwd(dy, h, approximate), None


def matmul_gelu_grad(dy, w, h, approximate):
    """dh = (dy w) * gelu'(h): cuBLAS GEMM, then the gelu_bwd epilogue pass."""
    return _cuda_ext.module().gelu_bwd(torch.matmul(dy, w), h, approximate)
