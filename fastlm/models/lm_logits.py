"""The LM head's logits for the few rows of a decode step.

    logits = h W^T        h (..., E) with R = prod(...) rows, W (V, E) the (tied) output
                          embedding, logits (..., V)

A decode step multiplies a handful of rows (R = batch size) by the whole (V, E) weight
(GPT-2: 50257 x 768, 154 MB in fp32): one pass over a weight that is far larger than any
cache, so the step costs what reading W costs. On CPU, PyTorch's ``F.linear`` hands this
to the BLAS as ``h @ W^T`` with W transposed, a layout whose small-R kernels read W
several times (``benchmarks/bench_lm_head.py``: about 2x slower than one pass for
2 <= R <= 16 on this project's CPU machines). The same product computed as ``(W h^T)^T``
is a tall GEMM over W in its stored row-major order, which streams W once. One row
(R = 1) is a matrix-vector product either way, where ``F.linear`` is already a single
pass, and many rows are a compute-bound GEMM that ``F.linear`` serves well: those keep
``F.linear``. The sum over E per logit is the same; only BLAS blocking differs, so results
agree to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows for which (W h^T)^T beats F.linear on CPU (see the module docstring).
FEW_ROWS = range(2, 17)
# Weights of at least this many elements (16 MiB in fp32: past a CPU's last-level cache)
# are read from memory on every call, which is where the layout matters; a smaller weight
# stays cached and F.linear is as fast.
LARGE_WEIGHT = 1 << 22


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(hidden, weight)`` for an LM head without bias: (..., E) x (V, E) -> (..., V)."""
    rows = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    if (
        hidden.device.type == "cpu" and rows in FEW_ROWS
        and weight.numel() >= LARGE_WEIGHT and weight.is_contiguous()
    ):  # fmt: skip
        flat = hidden.reshape(rows, hidden.shape[-1])
        out = torch.mm(weight, flat.t()).t().contiguous()
        return out.view(*hidden.shape[:-1], weight.shape[0])
    return F.linear(hidden, weight)
