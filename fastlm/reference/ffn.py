"""The bias+GELU feed-forward in plain PyTorch (forward and explicit backward).

    h   = x @ W1^T + b1                 x: (..., K), W1: (N, K), b1: (N,)
    a   = gelu(h)                       "none": h * Phi(h);  "tanh": 0.5 h (1 + tanh(u)),
                                        u = sqrt(2/pi) (h + 0.044715 h^3)
    out = a @ W2^T + b2 (+ residual)    W2: (H, N), b2: (H,)

Backward of y = gelu(x W^T + b) given dy:  dh = dy * gelu'(h),  dx = dh @ W,  dW = dh^T @ x,
db = sum over rows of dh. gelu_ffn chains two of these (the second linear without GELU).

Computed in fp32 (fp64 for fp64 inputs: the test oracle); outputs cast back to the input
dtype, gradients to the dtype of the tensor they belong to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm.reference._util import compute_dtype, up

# The cubic coefficient of GELU's tanh approximation, u = sqrt(2/pi) (h + 0.044715 h^3): a
# fitted number, not a closed form, so the kernels' copies are checked against this one.
GELU_TANH_CUBIC = 0.044715


def gelu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(h, approximate=approximate)


def gelu_grad(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """d gelu / d h, in h's dtype (call with fp32/fp64 h)."""
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (h + GELU_TANH_CUBIC * h**3))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * GELU_TANH_CUBIC * h * h)
    cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    return cdf + h * pdf


def gelu_backward(dy: torch.Tensor, h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """dh = dy * gelu'(h), in the compute dtype of h (not cast back)."""
    ct = compute_dtype(h.dtype)
    return dy.to(ct) * gelu_grad(h.to(ct), approximate)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b in the compute dtype (not cast back)."""
    ct = compute_dtype(x.dtype)
    return F.linear(x.to(ct), weight.to(ct), up(bias, ct))


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """gelu(x @ W^T + b), in x's dtype."""
    return gelu(linear(x, weight, bias), approximate).to(x.dtype)


def gelu_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    approximate: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """gelu(x W1^T + b1) W2^T + b2 (+ residual), in x's dtype.

    The intermediate activation is rounded to x's dtype, as the fused kernels store it (it is
    the operand of the second GEMM)."""
    ct = compute_dtype(x.dtype)
    a = linear_gelu(x, w1, b1, approximate)
    out = linear(a, w2, b2)
    if residual is not None:
        out = out + residual.to(ct)
    return out.to(x.dtype)


def linear_backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of h = x W^T + b given dh (M, N) for x (M, K): (dx, dW, db), compute dtype."""
    ct = compute_dtype(dh.dtype)
    dh = dh.to(ct)
    dx = dh @ weight.to(ct) if need_dx else None
    dw = dh.transpose(-1, -2) @ x.to(ct) if need_dweight else None
    db = dh.sum(0) if need_dbias else None
    return dx, dw, db
