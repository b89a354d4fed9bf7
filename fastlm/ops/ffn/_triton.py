"""linear_gelu / gelu_ffn on the fused Triton GEMM of fastlm.kernels.linear_gelu.

Every forward GEMM is one kernel with its bias, GELU and residual add in the epilogue
(constexpr HAS_BIAS / ACT / HAS_RESIDUAL), so the (M, N) pre-activation never makes an extra
round trip through memory; with STORE_PRE the same epilogue writes h for the backward while
the tile is still in registers.

Backward:
* linear_gelu: dh = dy * gelu'(h) is one elementwise pass (``gelu_bwd``) that also sums db
  over rows (fp32 partials per band of rows, no atomics).
* gelu_ffn: dh1 = (dout W2) * gelu'(h1) is a GEMM whose epilogue multiplies by gelu'(h1)
  (the kernel's ACT_GRAD mode), saving the write and re-read of dout W2.
* dx, dW: plain GEMMs with nothing to fuse, on cuBLAS (fastlm/ops/ffn/_cublas.py).

Weights are read in place through ``w.t()`` (the kernel takes any strides), so a GPT-2
Conv1D weight's transposed view costs no copy.
"""

from __future__ import annotations

# The plain dx / dW GEMMs are cuBLAS's on this backend too.
from fastlm.ops.ffn._cublas import linear_grads as linear_grads

# The kernel's activation name for each F.gelu ``approximate`` value.
_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


def reason(call) -> str | None:
    """No limits beyond the device's (backends.device_reason): the GEMM takes any shape and
    strides (K masked, rows wrapped, int64 offsets) and every float dtype."""
    return None


def _kernels():
    # Imported on first use: choosing a backend must not import triton.
    from fastlm.kernels import linear_gelu

    return linear_gelu


def linear_act(x, w, b, approximate, store_pre):
    """(gelu(x w^T + b), h = x w^T + b or None), one kernel."""
    return _kernels().fused_matmul(
        x, w.t(), bias=b, activation=_ACTIVATION[approximate], store_pre=store_pre
    )


def linear_residual(a, w, b, residual):
    """a w^T + b (+ residual), one kernel."""
    return _kernels().fused_matmul(a, w.t(), bias=b, residual=residual)[0]


def pre_activation(x, w, b):
    return _kernels().fused_matmul(x, w.t(), bias=b)[0]


def gelu_grad(dy, h, approximate, need_db):
    """(dh = dy * gelu'(h), db = row sum of dh in fp32 or None), one pass."""
    return _kernels().gelu_bwd(dy, h, _ACTIVATION[approximate], need_db)


def matmul_gelu_grad(dy, w, h, approximate):
    """dh = (dy w) * gelu'(h): the GEMM with the ACT_GRAD epilogue."""
    return _kernels().fused_matmul(dy, w, activation=_ACTIVATION[approximate], act_grad_of=h)[0]
