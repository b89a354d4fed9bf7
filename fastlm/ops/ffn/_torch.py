"""linear_gelu / gelu_ffn by PyTorch's own ops (F.linear + F.gelu) with PyTorch's autograd.

The fast path on CPU tensors and the fallback on CUDA: no custom op. F.linear with a bias
is one addmm (cuBLAS / MKL add the bias inside the GEMM); the GELU and the residual add are
one elementwise pass each. It serves every valid call, including weights given as a
transposed view (GPT-2's Conv1D ``weight.t()``), which the GEMM reads in place. The few
rows of a CPU decode step take fastlm.ops.linear's streamed form of the same product.
"""

from __future__ import annotations

import torch.nn.functional as F

from fastlm.ops.linear import linear

# run(call) gives the result with PyTorch's autograd: no custom op or backward of ours.
NATIVE = True


def reason(call) -> str | None:
    return None


def run(call):
    y = F.gelu(linear(call.x, call.w1, call.b1), approximate=call.approximate)
    if call.w2 is None:
        return y
    out = linear(y, call.w2, call.b2)
    return out if call.residual is None else out + call.residual
