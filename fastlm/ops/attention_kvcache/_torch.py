"""KV-cache decode attention by PyTorch's own fused ops, with no custom op and no host sync.

The fast path on CPU tensors and the fallback on CUDA; it serves every valid call. The
append is index arithmetic on the device (a gather, a where and an index_put per cache),
the attention is F.scaled_dot_product_attention over the whole preallocated cache with a
boolean mask of the keys each query may see (valid, and when causal bottom-right aligned),
its GQA mode reading the kv heads in place. Shapes never depend on cache_seqlens' values,
so a decode step traces under torch.compile(fullgraph=True) and captures in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# run(call) gives the result directly: no custom op of ours (inference only anyway).
NATIVE = True


def reason(call) -> str | None:
    return None


def out_of_range(cache_seqlens: torch.Tensor, seq_new: int, s_max: int) -> torch.Tensor:
    """(B,) bool: sequences whose cache_seqlens is negative or leaves no room for the
    ``seq_new`` appended tokens (the public op can check this on CPU only)."""
    return (cache_seqlens < 0) | (cache_seqlens > s_max - seq_new)


def append_kv(k_cache, v_cache, cache_seqlens, k, v, *, trusted: bool = False) -> None:
    """cache[b, cache_seqlens[b] + i] = new[b, i] for i < Sq, in place; a sequence whose
    new rows do not all fit is left untouched (its rows are written back unchanged).
    ``trusted``: the lengths are known to fit (checked on the host), so the guard is skipped."""
    bsz, sq = k.shape[0], k.shape[1]
    s_max = k_cache.shape[1]
    if sq == 0 or s_max == 0:  # nothing can be written (static shapes: no sync)
        return
    rows = torch.arange(bsz, device=k.device)[:, None].expand(bsz, sq)
    cols = cache_seqlens.to(torch.int64)[:, None] + torch.arange(sq, device=k.device)
    if trusted:
        k_cache.index_put_((rows, cols), k)
        v_cache.index_put_((rows, cols), v)
        return
    fits = ~out_of_range(cache_seqlens, sq, s_max)
    cols = cols.clamp(0, s_max - 1)  # in bounds for the rejected sequences too
    keep_new = fits[:, None, None, None]
    for cache, new in ((k_cache, k), (v_cache, v)):
        cache.index_put_((rows, cols), torch.where(keep_new, new, cache[rows, cols]))


def nan_where_out_of_range(out, cache_seqlens, seq_new: int, s_max: int) -> torch.Tensor:
    """The contract for lengths the host did not check: such a sequence's outputs are NaN."""
    bad = out_of_range(cache_seqlens, seq_new, s_max)
    return out.masked_fill(bad.view(-1, 1, 1, 1), float("nan"))


def run(call):
    """out (B, Sq, H, D) in q's dtype, after appending call.k, call.v into the caches."""
    q, k_cache, v_cache, seqlens = call.q, call.k_cache, call.v_cache, call.cache_seqlens
    # Lengths verified on the host (KVCacheCall.lengths_checked: CPU tensors) need none of
    # the guards that give unchecked out-of-range sequences NaN (the CUDA contract).
    trusted = call.lengths_checked
    if call.k is not None:
        append_kv(k_cache, v_cache, seqlens, call.k, call.v, trusted=trusted)
    sq, s_max = q.shape[1], call.s_max
    # Key j is visible to token i when j < L_b (and j <= L_b - Sq + i when causal: for a
    # single new token that is the same condition).
    lens = (seqlens.to(torch.int64) + call.seq_new)[:, None, None]  # (B, 1, 1)
    keys = torch.arange(s_max, device=q.device)
    visible = keys < lens  # (B, 1, S_max)
    if call.causal and sq > 1:
        tokens = torch.arange(sq, device=q.device)[:, None]
        visible = visible & (keys <= lens - sq + tokens)  # (B, Sq, S_max)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k_cache.transpose(1, 2),
        v_cache.transpose(1, 2),
        attn_mask=visible[:, None],
        scale=call.softmax_scale,
        enable_gqa=q.shape[2] != k_cache.shape[2],
    ).transpose(1, 2)
    # A query with no visible key gets zeros (SDPA's softmax over nothing is NaN). With new
    # tokens appended every query sees at least itself.
    if call.seq_new == 0:
        sees_a_key = visible.any(-1)[:, :, None, None]  # (B, Sq or 1, 1, 1)
        out = torch.where(sees_a_key, out, 0.0)
    if trusted:
        return out
    return nan_where_out_of_range(out, seqlens, call.seq_new, s_max)
