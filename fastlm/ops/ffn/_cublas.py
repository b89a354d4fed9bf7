"""The plain GEMMs of the FFN backward, shared by the triton and cuda backends.

dx = dh W and dW = dh^T x have no epilogue to fuse, so they go to torch.matmul: cuBLAS on
the GPU, where transposed operands are free (no copies) and which is the speed target
anyway. Results are in dh's dtype (the operands'), accumulated in fp32 by cuBLAS.
"""

from __future__ import annotations

import torch


def linear_grads(
    dh: torch.Tensor, x: torch.Tensor, w: torch.Tensor, need_dx: bool, need_dw: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of h = x w^T (+ b) given dh (M, N), x (M, K), w (N, K): (dx, dW)."""
    dx = torch.matmul(dh, w) if need_dx else None
    dw = torch.matmul(dh.t(), x) if need_dw else None
    return dx, dw
