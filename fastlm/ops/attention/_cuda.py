"""Attention forward on the FlashAttention-2 kernel of csrc/attention_fwd.cu (through
fastlm._cuda_ext; fp16/bf16, head_dim 64/128, no dropout, 16-byte aligned operands). Its
lse is the natural log-sum-exp (+inf and out = 0 on rows that see no key).

The kernel has no backward. The backward of a cuda forward runs the Triton backward
kernels: they need only q, k, v, out and the row log-sum-exp, and the natural lse converts
exactly in meaning (lse2 = lse * log2 e; +inf stays +inf, so rows that saw no key recompute
P = 2^(-inf) = 0 and get zero gradients, never NaN). The conversion adds one fp32 rounding
(relative 6e-8 of |lse2|), far below the fp16/bf16 rounding of the gradients. Where Triton
cannot run on the device (not importable) the reference backward takes the natural lse.
"""

from __future__ import annotations

import math

import torch

from fastlm import _cuda_ext, backends
from fastlm.ops.attention import _reference, _triton
from fastlm.ops.attention.call import AttentionCall, cu_seqlens_invalid

LOG2E = math.log2(math.e)  # log2(e): natural lse -> the Triton kernels' base-2 lse


def reason(call: AttentionCall) -> str | None:
    """All limits of the CUDA kernel (its binding checks them too, but with a TORCH_CHECK
    that would make an automatic choice fail instead of falling back)."""
    if call.q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA attention kernels take float16 or bfloat16, got {str(call.q.dtype)[6:]}"
    if call.head_dim not in _cuda_ext.ATTENTION_HEAD_DIMS:
        return f"the CUDA attention kernels support head_dim {_cuda_ext.ATTENTION_HEAD_DIMS}, got {call.head_dim}"
    if call.dropout_p:
        return f"the CUDA attention kernels have no dropout, got dropout_p={call.dropout_p}"
    # The kernel's grid is (query blocks, heads, batch): grid.y = heads, grid.z = batch.
    if call.batch > _cuda_ext.MAX_GRID_YZ or call.heads > _cuda_ext.MAX_GRID_YZ:
        return (
            f"the CUDA attention kernel needs batch <= {_cuda_ext.MAX_GRID_YZ} and heads <= "
            f"{_cuda_ext.MAX_GRID_YZ}, got {call.batch} and {call.heads}"
        )
    if (r := _cuda_ext.capability_reason(call.device)) is not None:
        return r
    for name, t, aligned in zip("qkv", (call.q, call.k, call.v), call.aligned16()):
        if not aligned:
            return (
                f"{name} needs 16-byte aligned data and strides (multiples of 8 elements), got "
                f"strides {tuple(t.stride())}"
            )
    return _cuda_ext.unavailable_reason()


def _refuse_dropout(call: AttentionCall) -> None:
    # reason() keeps dropout away; a direct call of the custom op must not get attention
    # without the dropout it asked for.
    if call.dropout_p:
        raise NotImplementedError(
            f"fastlm.{call.op}: the CUDA attention kernel has no dropout, got dropout_p={call.dropout_p}"
        )


def forward(call: AttentionCall, seed: torch.Tensor | None):
    """-> (out like q, contiguous; natural lse fp32 (B, H, Sq) or (H, total_q))."""
    _refuse_dropout(call)
    ext, c = _cuda_ext.module(), call
    if not c.varlen:
        kpm = c.key_padding_mask
        if kpm is not None and kpm.shape[1] > 1 and kpm.stride(1) != 1:
            # The kernel reads mask rows with unit stride; the mask is B * Sk bytes, so
            # copying a strided one costs nothing next to the attention itself.
            kpm = kpm.contiguous()
        return ext.attention(c.q, c.k, c.v, kpm, c.softmax_scale, c.causal)
    # The kernel clamps every span into the tensors; invalid offsets are flagged below.
    # The binding reads the offsets with unit stride: a (B + 1,) copy at most.
    total_q, total_k = c.q.shape[0], c.k.shape[0]
    out, lse = ext.attention_varlen(
        c.q, c.k, c.v, c.cu_seqlens_q.contiguous(), c.cu_seqlens_k.contiguous(),
        c.max_seqlen_q, c.max_seqlen_k, c.softmax_scale, c.causal,
    )  # fmt: skip
    bad = cu_seqlens_invalid(c.cu_seqlens_q, total_q, c.max_seqlen_q) | cu_seqlens_invalid(
        c.cu_seqlens_k, total_k, c.max_seqlen_k
    )
    return out.masked_fill_(bad, float("nan")), lse.masked_fill_(bad, float("nan"))


def backward(call: AttentionCall, seed, dout, out, lse):
    """Gradients from the natural lse: the Triton backward on lse * log2 e, or the
    reference backward where Triton cannot run."""
    _refuse_dropout(call)
    if backends.device_reason("triton", call.device) is None:
        # +inf (rows with no key) stays +inf: their P = 2^(S log2 e - inf) is exactly 0.
        return _triton.backward(call, seed, dout, out, lse * LOG2E)
    return _reference.backward(call, seed, dout, out, lse)
