"""fastlm.linear_gelu and fastlm.gelu_ffn: the bias+GELU feed-forward with fused epilogues.

    linear_gelu(x, W, b)                    y   = gelu(x W^T + b)
    gelu_ffn(x, W1, b1, W2, b2, residual=r) out = gelu(x W1^T + b1) W2^T + b2 + r

gelu: "none" = h * Phi(h) (exact erf GELU, BERT); "tanh" = 0.5 h (1 + tanh(u)),
u = sqrt(2/pi) (h + 0.044715 h^3) (GPT-2's gelu_new).

Layout of this folder (the same for every op):
    call.py        the call record (one for both ops) and all argument checks
    _op.py         the custom ops (fake + autograd) and the chain rule, over the kernel
                   backends' primitives; when the pre-activation h is stored
    _triton.py _cuda.py _torch.py _reference.py   one file per backend, each with
                   reason(call) -> str | None (all its limits) and its implementation
    _cublas.py     the plain backward GEMMs the triton and cuda backends share
"""

from __future__ import annotations

import torch

from fastlm import backends
from fastlm.ops import _autocast
from fastlm.ops.ffn._op import BACKENDS, run
from fastlm.ops.ffn.call import APPROXIMATIONS, OP_GELU_FFN, OP_LINEAR_GELU, FFNCall

__all__ = [
    "APPROXIMATIONS",
    "BACKENDS",
    "OP_GELU_FFN",
    "OP_LINEAR_GELU",
    "FFNCall",
    "gelu_ffn",
    "linear_gelu",
]


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    approximate: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """y = gelu(x @ weight.T + bias), the bias and GELU fused into the GEMM.

    x: (..., K) with a contiguous last dim; weight: (N, K) as torch.nn.Linear, any strides
    (a transposed view such as GPT-2's Conv1D ``weight.t()`` is read in place); bias: (N,) or
    None. ``approximate``: "none" (exact erf GELU, BERT) or "tanh" (GPT-2's gelu_new).
    fp16, bf16, fp32 (true fp32 unless TF32 is enabled in torch), fp32 accumulation.
    Returns (..., N) in x's dtype. Differentiable in x, weight and bias.
    """
    if (low := _autocast.dtype_for(x)) is not None:
        with _autocast.disabled(x.device):  # F.linear's policy: everything in low
            x, weight, bias = _autocast.cast(low, x, weight, bias)
            return linear_gelu(x, weight, bias, approximate=approximate, backend=backend)
    call = FFNCall.checked(OP_LINEAR_GELU, x, weight, bias, approximate=approximate)
    return _serve(call, backend)


def gelu_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    approximate: str = "none",
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """out = gelu(x @ w1.T + b1) @ w2.T + b2 (+ residual): the transformer MLP in two fused GEMMs.

    x: (..., H) with a contiguous last dim; w1: (I, H), b1: (I,) or None; w2: (H_out, I),
    b2: (H_out,) or None (weights as torch.nn.Linear, any strides); residual: (..., H_out) or
    None, added in the second GEMM's epilogue (BERT's output.dense(...) + input_tensor).
    Returns (..., H_out) in x's dtype. Differentiable in every tensor argument.
    """
    if (low := _autocast.dtype_for(x)) is not None:
        with _autocast.disabled(x.device):
            x, w1, b1, w2, b2 = _autocast.cast(low, x, w1, b1, w2, b2)
            if residual is None or residual.dtype == low:
                return gelu_ffn(x, w1, b1, w2, b2, approximate=approximate, residual=residual,
                                backend=backend)  # fmt: skip
            # The second F.linear's output meets the residual in a plain `+`, which promotes.
            return gelu_ffn(x, w1, b1, w2, b2, approximate=approximate, backend=backend) + residual
    call = FFNCall.checked(OP_GELU_FFN, x, w1, b1, w2, b2, residual, approximate=approximate)
    return _serve(call, backend)


def _serve(call: FFNCall, backend: str | None) -> torch.Tensor:
    chosen = backends.choose(call.op, call, BACKENDS, backend)
    native = _NATIVE_RUNS.get(chosen)
    if native is not None:
        return native(call)
    return run(call, chosen)


_NATIVE_RUNS = backends.native_runs(BACKENDS)
