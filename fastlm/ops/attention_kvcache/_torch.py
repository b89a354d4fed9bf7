"""KV-cache decode attention by PyTorch's own fused ops, with no custom op and no host sync.

The fast path on CPU tensors and the fallback on CUDA; it serves every valid call. The
append is index arithmetic on the device (a gather, a where and an index_put per cache);
the attention is F.scaled_dot_product_attention, its GQA mode reading the kv heads in
place. Rows past a sequence's length are never read into its result, whatever they hold:

* lengths the checks read on the host (eager CPU calls, python ints): each sequence
  attends over its own first L_b rows (one call for the batch when all lengths are equal,
  else one per sequence), so nothing past them is read or computed;
* otherwise (CUDA, torch.compile): one call over the whole preallocated cache with a
  boolean mask of the keys each query may see (valid, and when causal bottom-right
  aligned), the rows past the lengths zeroed first (a where per cache). Shapes never depend
  on cache_seqlens' values, so a decode step traces under torch.compile(fullgraph=True)
  and captures in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.reference.attention import allowed_mask

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
    if call.k is not None:
        # Lengths verified on the host (KVCacheCall.lengths_checked: CPU tensors) need no
        # guard for sequences whose new rows do not fit (the CUDA contract).
        append_kv(
            call.k_cache, call.v_cache, call.cache_seqlens, call.k, call.v,
            trusted=call.lengths_checked,
        )  # fmt: skip
    if call.host_lengths is None:
        return _attend_masked(call)
    return _attend_by_length(call, call.host_lengths)


def _attend_by_length(call, cached: list[int]) -> torch.Tensor:
    """The lengths were read on the host by the checks (eager CPU calls, python ints): each
    sequence attends over its own first L_b rows, so nothing past them is read (or
    computed), and sequences of one length share one SDPA call."""
    q, k_cache, v_cache = call.q, call.k_cache, call.v_cache
    if len(set(cached)) <= 1:  # one length for the batch (or an empty batch)
        n = (cached[0] if cached else 0) + call.seq_new
        return _attend_prefix(call, q, k_cache[:, :n], v_cache[:, :n])
    outs = [
        _attend_prefix(call, q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
        for b, n in enumerate(length + call.seq_new for length in cached)
    ]
    return torch.cat(outs)


def _attend_prefix(call, q, keys, values) -> torch.Tensor:
    """q (b, Sq, H, D) over every row of keys, values (b, n, Hkv, D): causal aligned
    bottom-right; a query that sees no key (n < Sq without an append) gets zeros."""
    sq, n = q.shape[1], keys.shape[1]
    if n == 0:
        return q.new_zeros(q.shape)
    visible = None
    if call.causal and sq > 1 and sq != n:
        visible = allowed_mask(sq, n, True, None, q.device)  # (1, 1, Sq, n)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=visible,
        is_causal=call.causal and sq > 1 and sq == n,
        scale=call.softmax_scale,
        enable_gqa=q.shape[2] != keys.shape[2],
    ).transpose(1, 2)
    if n < sq and visible is not None:  # the first Sq - n queries see no key
        out = torch.where(visible.any(-1)[0, 0, :, None, None], out, 0.0)
    return out


def _attend_masked(call) -> torch.Tensor:
    """Lengths not read on the host (CUDA, torch.compile): one SDPA call over the whole
    S_max with a mask of the keys each query may see; no host sync, shapes independent of
    cache_seqlens' values."""
    q, k_cache, v_cache, seqlens = call.q, call.k_cache, call.v_cache, call.cache_seqlens
    sq, s_max = q.shape[1], call.s_max
    # Key j is visible to token i when j < L_b (and j <= L_b - Sq + i when causal: for a
    # single new token that is the same condition).
    lens = (seqlens.to(torch.int64) + call.seq_new)[:, None, None]  # (B, 1, 1)
    keys = torch.arange(s_max, device=q.device)
    exists = keys < lens  # (B, 1, S_max)
    visible = exists
    if call.causal and sq > 1:
        tokens = torch.arange(sq, device=q.device)[:, None]
        visible = visible & (keys <= lens - sq + tokens)  # (B, Sq, S_max)
    # Rows past a sequence's length hold anything (a cache from torch.empty): masking their
    # scores is not enough (NaN + -inf is NaN, and a zero weight times a NaN value is NaN),
    # so they reach SDPA as zeros.
    rows = exists[:, 0, :, None, None]  # (B, S_max, 1, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        torch.where(rows, k_cache, 0.0).transpose(1, 2),
        torch.where(rows, v_cache, 0.0).transpose(1, 2),
        attn_mask=visible[:, None],
        scale=call.softmax_scale,
        enable_gqa=q.shape[2] != k_cache.shape[2],
    ).transpose(1, 2)
    # A query with no visible key gets zeros (SDPA's softmax over nothing is NaN). With new
    # tokens appended every query sees at least itself.
    if call.seq_new == 0:
        sees_a_key = visible.any(-1)[:, :, None, None]  # (B, Sq or 1, 1, 1)
        out = torch.where(sees_a_key, out, 0.0)
    if call.lengths_checked:
        return out
    return nan_where_out_of_range(out, seqlens, call.seq_new, s_max)
