"""Attention on the Triton kernels of fastlm.kernels.attention_fwd / attention_bwd
(FlashAttention-2 forward and recompute backward, counter-based dropout in the kernels).

Its lse is the base-2 log-sum-exp (natural lse * log2 e), the unit its backward consumes.
Packed calls hand the kernels contiguous (B + 1,) offsets: the kernels read cu_seqlens with
unit stride, and a strided view (``cu[::2]``) copied here costs B + 1 ints. The kernels
clamp every sequence span into the tensors; if the values are invalid (possible only on
CUDA tensors, where they are not checked on the host) every output is then set to NaN on
the device, the defined result documented in fastlm.attention_varlen.
"""

from __future__ import annotations

import torch

from fastlm.kernels.limits import ATTENTION_MAX_HEAD_DIM, ATTENTION_MIN_HEAD_DIM
from fastlm.ops.attention.call import AttentionCall


def reason(call: AttentionCall) -> str | None:
    if not ATTENTION_MIN_HEAD_DIM <= call.head_dim <= ATTENTION_MAX_HEAD_DIM:
        return (
            f"head_dim {call.head_dim} is outside the Triton kernels' range "
            f"{ATTENTION_MIN_HEAD_DIM}..{ATTENTION_MAX_HEAD_DIM}"
        )
    return None


def _offsets(call: AttentionCall) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not call.varlen:
        return None, None
    return call.cu_seqlens_q.contiguous(), call.cu_seqlens_k.contiguous()


def _launch_args(call: AttentionCall, cu_q, cu_k) -> tuple:
    """The launchers' shared arguments, built here only."""
    return (
        call.q, call.k, call.v, call.key_padding_mask, cu_q, cu_k,
        call.max_seqlen_q, call.max_seqlen_k, call.causal, call.softmax_scale, call.dropout_p,
    )  # fmt: skip


def _seed(seed: torch.Tensor | None) -> int:
    return int(seed.item()) if seed is not None else 0  # a CPU tensor: no device sync


def _nan_if_invalid(call: AttentionCall, cu_q, cu_k, outputs) -> None:
    if call.varlen:
        from fastlm.kernels.attention_common import nan_if_invalid_cu_seqlens

        nan_if_invalid_cu_seqlens(
            outputs, cu_q, cu_k, call.q.shape[0], call.k.shape[0],
            call.max_seqlen_q, call.max_seqlen_k,
        )  # fmt: skip


def forward(call: AttentionCall, seed: torch.Tensor | None):
    """-> (out like q, contiguous; lse2 fp32 (B, H, Sq) or (H, total_q))."""
    from fastlm.kernels.attention_fwd import attention_fwd

    cu_q, cu_k = _offsets(call)
    out, lse2 = attention_fwd(*_launch_args(call, cu_q, cu_k), _seed(seed))
    _nan_if_invalid(call, cu_q, cu_k, (out, lse2))
    return out, lse2


def backward(call: AttentionCall, seed, dout, out, lse2):
    """Gradients (dq, dk, dv) from the base-2 lse of ``forward``."""
    from fastlm.kernels.attention_bwd import attention_bwd

    cu_q, cu_k = _offsets(call)
    q, k, v, *rest = _launch_args(call, cu_q, cu_k)
    grads = attention_bwd(dout, q, k, v, out, lse2, *rest, _seed(seed))
    _nan_if_invalid(call, cu_q, cu_k, grads)
    return grads


def dropout_mask(seed: int, batch, heads, seq_q, seq_k, dropout_p, device) -> torch.Tensor:
    """The kernels' keep-mask (B, H, Sq, Sk) bool, from their own RNG function."""
    from fastlm.kernels.attention_common import dropout_keep_mask

    return dropout_keep_mask(seed, batch, heads, seq_q, seq_k, dropout_p, device)
