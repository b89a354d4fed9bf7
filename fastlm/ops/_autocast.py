"""fastlm's ops inside a ``torch.autocast`` region: the dtypes PyTorch's own ops would use.

Autocast casts the inputs of each PyTorch op by a per-device policy. fastlm's ops stand in
for such ops, so each casts its floating-point operands the way the op it replaces would,
then runs itself with autocast off (its checks otherwise require the operands to agree, and
its backends' internal math must keep the dtypes they choose):

    fastlm op                     replaces                      under autocast
    attention, attention_varlen   F.scaled_dot_product_attention  q, k, v -> autocast dtype
    linear_gelu, gelu_ffn         F.linear + F.gelu (+ residual)  x, weights -> autocast dtype;
                                                                  residual promotes, as `+`
    layer_norm(x, residual=r)     F.layer_norm(x + r)             x, r promote (`+`); the norm
                                                                  runs in fp32 on CUDA (its
                                                                  policy there), in that
                                                                  promoted dtype on CPU
    attention_with_kvcache        SDPA over the cache             q, k, v -> the cache's dtype
                                                                  (the cache is the user's
                                                                  storage); out -> autocast dtype

Outside autocast nothing is cast. The gate is one flag read (~0.2 µs), so the hot path
keeps its cost; torch.compile traces it like PyTorch's own autocast checks.
"""

from __future__ import annotations

import torch

_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def dtype_for(operand: object) -> torch.dtype | None:
    """The autocast dtype for ``operand``'s device inside an active autocast region there,
    else None (also for devices autocast does not cover, and for a non-tensor, which the
    op's checks then refuse)."""
    if _any_enabled is not None and not _any_enabled():
        return None
    if not isinstance(operand, torch.Tensor):
        return None
    kind = operand.device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def disabled(device: torch.device):
    """A region with autocast off on ``device``: the op has cast its operands by the policy
    above, and its backends' internal math (fp32 statistics, reference matmuls) must run in
    the dtypes they choose, not be recast by autocast."""
    return torch.autocast(device.type, enabled=False)


def cast(dtype: torch.dtype, *operands: object) -> tuple:
    """Each floating-point tensor in ``dtype``; anything else passes through untouched (None,
    masks, and wrong arguments, which the op's checks then refuse)."""
    return tuple(
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
        else t
        for t in operands
    )


def norm_dtype(device: torch.device, x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """The dtype LayerNorm(x + residual) runs in under autocast on ``device``."""
    if device.type == "cuda":
        return torch.float32
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
