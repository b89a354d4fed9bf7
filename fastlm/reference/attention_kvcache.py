"""KV-cache decode attention in plain PyTorch (the ``torch`` backend and a benchmark baseline).

Shapes: q (B, Sq, H, D); k_cache, v_cache (B, S_max, Hkv, D) with Hkv dividing H;
cache_seqlens (B,) int32; k, v (B, Sq, Hkv, D) or None.

    append (when k, v are given):   cache[b, cache_seqlens[b] + i] = new[b, i],  i < Sq
    L_b  = cache_seqlens[b] + (Sq if appended else 0)         keys of sequence b
    query token i, head h reads kv head h // (H / Hkv) and keys j with
        j < L_b   and, when causal,   j <= L_b - Sq + i          (bottom-right aligned)
    out[b, i, h] = softmax_j(scale * q . k_j) @ v_j            (zeros when no key is visible)

Everything is computed over the whole S_max with a mask, so the shapes do not depend on
the values of cache_seqlens (torch.compile traces it without data-dependent shapes).
"""

from __future__ import annotations

import math

import torch

from fastlm.reference._util import compute_dtype


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write k, v (B, Sq, Hkv, D) into the caches at rows cache_seqlens[b] + i, in place.

    A sequence whose new rows do not all fit in [0, S_max) is left untouched (its rows
    are written back with their old values), without a host sync for checking.
    """
    b, sq = k.shape[0], k.shape[1]
    s_max = k_cache.shape[1]
    start = cache_seqlens.to(torch.int64)[:, None]
    fits = ((start >= 0) & (start + sq <= s_max))[:, :, None, None]  # (B, 1, 1, 1)
    rows = torch.arange(b, device=k.device)[:, None].expand(b, sq)
    cols = (start + torch.arange(sq, device=k.device)[None, :]).clamp(0, max(s_max - 1, 0))
    for cache, new in ((k_cache, k), (v_cache, v)):
        cache.index_put_((rows, cols), torch.where(fits, new, cache[rows, cols]))


def kvcache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens_k: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of q (B, Sq, H, D) over the first seqlens_k[b] rows of the caches.

    ``seqlens_k`` counts the keys (new ones included). Returns (B, Sq, H, D) in q's dtype.
    """
    bsz, sq, h, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    group = h // hkv
    # (B, Hkv, G, Sq, D): query heads h = kv * G + g share kv head kv.
    qg = q.to(ct).view(bsz, sq, hkv, group, d).permute(0, 2, 3, 1, 4)
    kc = k_cache.to(ct).permute(0, 2, 1, 3)  # (B, Hkv, S_max, D)
    vc = v_cache.to(ct).permute(0, 2, 1, 3)
    scores = torch.einsum("bkgqd,bksd->bkgqs", qg, kc) * scale

    j = torch.arange(s_max, device=q.device)
    lens = seqlens_k.to(torch.int64).view(bsz, 1)
    visible = j[None, None, :] < lens[:, :, None]  # (B, 1, S_max)
    if causal:
        i = torch.arange(sq, device=q.device)
        last = lens[:, :, None] - sq + i[None, :, None]  # (B, Sq, 1): last key token i sees
        visible = visible & (j[None, None, :] <= last)
    visible = visible[:, None, None]  # (B, 1, 1, Sq or 1, S_max)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key gives zeros, not NaN: subtract a finite max, zero the weights.
    row_max = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(ct).min)
    p = torch.exp(scores - row_max).masked_fill(~visible, 0.0)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bkgqs,bksd->bkgqd", p, vc)  # (B, Hkv, G, Sq, D)
    return out.permute(0, 3, 1, 2, 4).reshape(bsz, sq, h, d).to(q.dtype)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Append k, v (if given) into the caches in place, then attend. See the module docstring."""
    seqlens_k = cache_seqlens
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v)
        seqlens_k = cache_seqlens + k.shape[1]
    return kvcache_attention(q, k_cache, v_cache, seqlens_k, causal, softmax_scale)
