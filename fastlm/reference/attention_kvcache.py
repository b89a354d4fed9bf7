"""KV-cache decode attention in plain PyTorch: the clear oracle (``backend="reference"``).

Shapes: q (B, Sq, H, D); k_cache, v_cache (B, S_max, Hkv, D) with Hkv dividing H;
cache_seqlens (B,) int32; k, v (B, Sq, Hkv, D) or None.

    append (when k, v are given):   cache[b, cache_seqlens[b] + i] = new[b, i],  i < Sq
    L_b  = cache_seqlens[b] + (Sq if appended else 0)         keys of sequence b
    query token i, head h reads kv head h // (H / Hkv) and keys j with
        j < L_b   and, when causal,   j <= L_b - Sq + i          (bottom-right aligned)
    out[b, i, h] = softmax_j(scale * q . k_j) @ v_j            (zeros when no key is visible)

Rows j >= L_b are never read into the result, whatever they hold (NaN or inf in a cache
allocated with torch.empty included).

Out-of-range lengths (cache_seqlens[b] < 0 or L_b > S_max, which the public op cannot
check on CUDA without a host sync): sequence b's cache rows are left untouched and its
outputs are NaN, so the error cannot pass for an answer. An empty cache (S_max = 0) has no
key: with cache_seqlens 0 and nothing appended every output is zero.

The append is a plain loop over the sequences, the clearest statement of it (it reads
cache_seqlens on the host: an oracle, not a serving path). The attention is computed over
the whole S_max with a mask.
"""

from __future__ import annotations

import torch

from fastlm.reference._util import compute_dtype


def out_of_range(cache_seqlens: torch.Tensor, seq_new: int, s_max: int) -> torch.Tensor:
    """(B,) bool: sequences whose ``seq_new`` appended tokens (or whose keys) do not fit."""
    return (cache_seqlens < 0) | (cache_seqlens > s_max - seq_new)


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write k, v (B, Sq, Hkv, D) into the caches at rows cache_seqlens[b] + i, in place.

    A sequence whose new rows do not all fit in [0, S_max) is left untouched.
    """
    bsz, sq = k.shape[0], k.shape[1]
    bad = out_of_range(cache_seqlens, sq, k_cache.shape[1])
    for b in range(bsz):
        if not bad[b]:
            start = int(cache_seqlens[b])
            k_cache[b, start : start + sq] = k[b]
            v_cache[b, start : start + sq] = v[b]


def kvcache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    """Attention of q (B, Sq, H, D) over the first seqlens_k[b] rows of the caches.

    ``seqlens_k`` counts the keys (new ones included), each in [0, S_max]. Returns
    (B, Sq, H, D) in q's dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    bsz, sq, h, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    ct = compute_dtype(q.dtype)
    group = h // hkv
    # (B, Hkv, G, Sq, D): query heads h = kv * G + g share kv head kv.
    j = torch.arange(s_max, device=q.device)
    lens = seqlens_k.to(torch.int64).view(bsz, 1)
    # Rows past a sequence's length hold anything (a cache from torch.empty: NaN, inf):
    # they are zeroed before any product, since a masked score or a zero weight times NaN
    # would still be NaN.
    exists = (j[None, :] < lens)[:, None, :, None]  # (B, 1, S_max, 1)
    qg = q.to(ct).view(bsz, sq, hkv, group, d).permute(0, 2, 3, 1, 4)
    kc = torch.where(exists, k_cache.to(ct).permute(0, 2, 1, 3), 0.0)  # (B, Hkv, S_max, D)
    vc = torch.where(exists, v_cache.to(ct).permute(0, 2, 1, 3), 0.0)
    scores = torch.einsum("bkgqd,bksd->bkgqs", qg, kc) * softmax_scale

    visible = j[None, None, :] < lens[:, :, None]  # (B, 1, S_max)
    if causal:
        i = torch.arange(sq, device=q.device)
        last = lens[:, :, None] - sq + i[None, :, None]  # (B, Sq, 1): last key token i sees
        visible = visible & (j[None, None, :] <= last)
    visible = visible[:, None, None]  # (B, 1, 1, Sq or 1, S_max)
    # A row with no visible key gives zeros, not NaN: softmax over the visible keys only,
    # and an all-masked row (or an empty cache) keeps weights of zero.
    weights = torch.zeros_like(scores)
    if s_max > 0:
        scores = scores.masked_fill(~visible, float("-inf"))
        row_max = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(ct).min)
        p = torch.exp(scores - row_max).masked_fill(~visible, 0.0)
        denom = p.sum(-1, keepdim=True)
        weights = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bkgqs,bksd->bkgqd", weights, vc)  # (B, Hkv, G, Sq, D)
    return out.permute(0, 3, 1, 2, 4).reshape(bsz, sq, h, d).to(q.dtype)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    """Append k, v (if given) into the caches in place, then attend; NaN for sequences
    whose lengths are out of range. See the module docstring."""
    seq_new = 0 if k is None else k.shape[1]
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v)
    bad = out_of_range(cache_seqlens, seq_new, k_cache.shape[1])
    seqlens_k = torch.where(bad, 0, cache_seqlens + seq_new)
    out = kvcache_attention(q, k_cache, v_cache, seqlens_k, causal, softmax_scale)
    return out.masked_fill(bad.view(-1, 1, 1, 1), float("nan"))
