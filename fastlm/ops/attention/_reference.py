"""Attention by fastlm.reference (fp32 internally, fp64 for fp64): the clear oracle, served
only when asked for by name (``backend="reference"``), for debugging a kernel against it.

It runs through the custom op like the kernel backends, with the explicit recompute
backward of fastlm.reference.attention. Its lse is the natural log-sum-exp (+inf on rows
that see no key). Dropout: a keep-mask drawn with torch.rand from a generator seeded with
the call's seed (reproducible for a fixed torch.manual_seed; a different mask from the
Triton kernels' counter-based one).
"""

from __future__ import annotations

import torch

from fastlm.ops.attention.call import AttentionCall
from fastlm.reference import attention as ref


def reason(call: AttentionCall) -> str | None:
    return None


def dropout_mask(seed: int, batch, heads, seq_q, seq_k, dropout_p, device) -> torch.Tensor:
    """The keep-mask (B, H, Sq, Sk) bool: torch.rand(...) >= p on a generator seeded with
    ``seed``. Varlen sequence b uses the top-left corner of mask[b]."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    u = torch.rand((batch, heads, seq_q, seq_k), generator=gen, device=device)
    return u >= dropout_p


def _keep(call: AttentionCall, seed: torch.Tensor | None) -> torch.Tensor | None:
    if seed is None or call.dropout_p == 0.0:
        return None
    return dropout_mask(
        int(seed.item()), call.batch, call.heads, call.max_seqlen_q, call.max_seqlen_k,
        call.dropout_p, call.device,
    )  # fmt: skip


def forward(call: AttentionCall, seed: torch.Tensor | None):
    """-> (out like q, contiguous; natural lse fp32 (B, H, Sq) or (H, total_q))."""
    c, keep = call, _keep(call, seed)
    if c.varlen:
        out, lse = ref.attention_varlen(
            c.q, c.k, c.v, c.cu_seqlens_q, c.cu_seqlens_k, c.causal, c.softmax_scale,
            keep, c.dropout_p, return_lse=True,
        )  # fmt: skip
    else:
        out, lse = ref.attention(
            c.q, c.k, c.v, c.causal, c.key_padding_mask, c.softmax_scale, keep, c.dropout_p,
            return_lse=True,
        )  # fmt: skip
    return out.contiguous(), lse.float().contiguous()


def backward(call: AttentionCall, seed, dout, out, lse):
    """Gradients (dq, dk, dv) from the natural lse of ``forward``."""
    c, keep = call, _keep(call, seed)
    if c.varlen:
        grads = ref.attention_varlen_backward(
            dout, c.q, c.k, c.v, out, lse, c.cu_seqlens_q, c.cu_seqlens_k, c.causal,
            c.softmax_scale, keep, c.dropout_p,
        )  # fmt: skip
    else:
        grads = ref.attention_backward(
            dout, c.q, c.k, c.v, out, lse, c.causal, c.key_padding_mask, c.softmax_scale,
            keep, c.dropout_p,
        )  # fmt: skip
    return tuple(g.contiguous() for g in grads)
