"""linear_gelu / gelu_ffn by PyTorch's own ops (F.linear + F.gelu) with PyTorch's autograd.

The fast path on CPU tensors and the fallback on CUDA: no custom op. F.linear with a bias
is one addmm (cuBLAS / MKL add the bias inside the GEMM); the GELU and the residual add are
one elementwise pass each. It serves every valid call, including weights given as a
transposed view (GPT-2's Conv1D ``weight.t()``), which the GEMM reads in place. The few
rows of a CPU decode step take fastlm.ops.linear's streamed form of the same product.

Where autograd records nothing (inference, ``no_grad``, frozen weights and inputs), the GELU
and the residual add overwrite the GEMMs' fresh outputs instead of allocating their own:
one (rows, N) activation fewer per FFN (the largest of the layer, 4x the hidden size),
so a lower peak and one fewer pass over freshly mapped pages. The values are the same
(bit for bit: the same ops on the same inputs). With autograd recording, GELU's backward
needs its input, so the out-of-place ops run there; a traced forward keeps them too (the
compiler fuses them itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops.linear import linear

# run(call) gives the result with PyTorch's autograd: no custom op or backward of ours.
NATIVE = True


def reason(call) -> str | None:
    return None


def _overwrite(fresh: torch.Tensor) -> bool:
    """Whether ``fresh`` (an op's new output, aliased by nothing) may be overwritten by the
    next op: autograd keeps no record of it and no compiler traces it."""
    return not fresh.requires_grad and not torch.compiler.is_compiling()


# The in-place GELU by its direct binding (F.gelu's own namespace): torch.ops.aten.gelu_
# resolves its overload in Python on every call, 33 against 15 us on a small layer.
_gelu_ = getattr(torch._C._nn, "gelu_", torch.ops.aten.gelu_)


def run(call):
    h = linear(call.x, call.w1, call.b1)
    if _overwrite(h):
        y = _gelu_(h, approximate=call.approximate)
    else:
        y = F.gelu(h, approximate=call.approximate)
    if call.w2 is None:
        return y
    out = linear(y, call.w2, call.b2)
    if call.residual is None:
        return out
    return out.add_(call.residual) if _overwrite(out) else out + call.residual
