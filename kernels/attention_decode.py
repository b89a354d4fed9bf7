"""KV-cache decode attention: append, split-KV flash-decoding and the split combine.

Shapes: q (B, Sq, H, D); k_cache, v_cache (B, S_max, Hkv, D), any strides with a
contiguous last dim; cache_seqlens (B,) int32; new k, v (B, Sq, Hkv, D); G = H / Hkv.
Query head h reads kv head h // G. Sequence b has L_b keys (cache_seqlens[b], plus Sq
when new keys were appended); query token i sees keys j < L_b, and when causal only
j <= L_b - Sq + i (bottom-right alignment).

1. ``_append_kv_kernel`` (grid B*Sq): cache[b, cache_seqlens[b] + i, :, :] = new[b, i].
   A sequence whose new tokens do not all fit in [0, S_max) is not written at all.

2. ``_decode_split_kernel`` (grid B*Hkv, NUM_SPLITS, row blocks). One program owns one
   (batch, kv head), one slice of that sequence's keys and a block of BLOCK_M query rows.
   The rows are r = i * G + g (token i, head g of the group), so the K/V cache is read
   once per kv head for every query token and every query head sharing it (GQA). The
   slice comes from L_b itself: the sequence's ceil(L_b / BLOCK_N) key blocks are dealt
   out evenly over the splits, so short and long sequences in a ragged batch both spread
   over all splits without the host knowing L_b (no device->host sync). Online softmax
   in base 2 over the slice:

       s_j = (q . k_j) * scale * log2(e),   m = max_j s_j,   l = sum_j 2^(s_j - m)
       o   = sum_j 2^(s_j - m) v_j / l,      lse2 = m + log2(l)

   With one split, o goes straight to the output. Otherwise o and lse2 go to fp32 scratch
   (B, Sq, H, NUM_SPLITS, D) and (B, Sq, H, NUM_SPLITS); a split with no keys stores
   o = 0, lse2 = -inf.

3. ``_decode_combine_kernel`` (grid B*Sq*H): out = sum_s w_s o_s / sum_s w_s with
   w_s = 2^(lse2_s - max lse2); zeros when no split saw a key.

Invalid lengths (cache_seqlens < 0, or L_b > S_max) cannot be checked on the host without
a sync on CUDA: the kernels never touch memory outside the cache for them and write NaN
to that sequence's output, so the error cannot pass silently.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels._launch import fp32_dot_precision, next_pow2, num_programs_hint
from fastlm.kernels.attention_common import LOG2E
from fastlm.kernels.limits import DECODE_MAX_HEAD_DIM

MAX_HEAD_DIM = DECODE_MAX_HEAD_DIM
MAX_SPLITS = 128


@triton.jit
def _append_kv_kernel(
    K, V, KC, VC, SEQLENS,
    Sq, Hkv, D, S_max,
    s_kb, s_ks, s_kh, s_vb, s_vs, s_vh,
    s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // Sq
    i = pid % Sq
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    # The start as a (BLOCK_H, 1) tensor: the interpreter rejects masks built from a
    # scalar loaded value.
    start = tl.load(SEQLENS + b) + tl.zeros((BLOCK_H, 1), dtype=tl.int32)
    # A sequence whose new tokens do not all fit is left untouched (its output is NaN).
    # start <= S_max - Sq, not start + Sq <= S_max: near 2^31 the sum wraps negative.
    ok = (heads < Hkv) & (dims < D) & (start >= 0) & (start <= S_max - Sq)
    pos = start + i
    b64 = b.to(tl.int64)
    pos64 = pos.to(tl.int64)
    k = tl.load(K + b64 * s_kb + i * s_ks + heads * s_kh + dims, mask=ok)
    v = tl.load(V + b64 * s_vb + i * s_vs + heads * s_vh + dims, mask=ok)
    tl.store(KC + b64 * s_kcb + pos64 * s_kcs + heads * s_kch + dims, k, mask=ok)
    tl.store(VC + b64 * s_vcb + pos64 * s_vcs + heads * s_vch + dims, v, mask=ok)


@triton.jit
def _decode_split_kernel(
    Q, KC, VC, SEQLENS, OUT, O_PART, LSE_PART,
    Sq, H, Hkv, D, S_max, seq_extra, qk_scale,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv

    # Query rows of this program: r = i * GROUP + g -> token i, query head kvh * GROUP + g.
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = tok < Sq
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    b64 = b.to(tl.int64)

    cached = tl.load(SEQLENS + b)
    # cache_seqlens < 0 or overflowing the cache (compared before adding: no int32 wrap).
    bad = (cached < 0) | (cached > S_max - seq_extra)
    n_keys = tl.where(bad, 0, cached + seq_extra)

    # This split's share of the sequence's key blocks.
    blocks = tl.cdiv(n_keys, BLOCK_N)
    per_split = tl.cdiv(blocks, NUM_SPLITS)
    lo = split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, n_keys)
    if CAUSAL:
        # No row of this block sees past the key of its last token.
        last_tok = tl.minimum((tl.program_id(2) * BLOCK_M + BLOCK_M - 1) // GROUP, Sq - 1)
        hi = tl.minimum(hi, n_keys - Sq + last_tok + 1)

    q_ptrs = Q + b64 * s_qb + tok[:, None] * s_qs + head[:, None] * s_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_base = b64 * s_kb + kvh * s_kh
    vv_base = b64 * s_vb + kvh * s_vh
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        key_ok = keys < hi
        keys64 = keys.to(tl.int64)
        kt = tl.load(
            KC + kv_base + keys64[None, :] * s_ks + dims[:, None],
            mask=key_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= (n_keys - Sq + tok)[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows that have seen no key keep m = -inf; use 0 there so no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            VC + vv_base + keys64[:, None] * s_vs + dims[None, :],
            mask=key_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        o = tl.where(bad, float("nan"), o)
        o_ptrs = OUT + b64 * s_ob + tok[:, None] * s_os + head[:, None] * s_oh + dims[None, :]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=out_mask)
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        # Scratch (B, Sq, H, NUM_SPLITS[, D]), contiguous.
        row_idx = ((b64 * Sq + tok) * H + head) * NUM_SPLITS + split
        tl.store(LSE_PART + row_idx, lse, mask=row_ok)
        tl.store(O_PART + row_idx[:, None] * D + dims[None, :], o, mask=out_mask)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, SEQLENS, OUT,
    Sq, H, D, S_max, seq_extra, s_ob, s_os, s_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (b * Sq + i) * H + h
    h = row % H
    i = (row // H) % Sq
    b = row // (H * Sq)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    row64 = row.to(tl.int64)

    lse = tl.load(LSE_PART + row64 * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty splits
    total = tl.sum(w, axis=0)
    o = tl.load(
        O_PART + (row64 * NUM_SPLITS + splits[:, None]) * D + dims[None, :],
        mask=split_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    cached = tl.load(SEQLENS + b)
    bad = (cached < 0) | (cached > S_max - seq_extra)
    out = tl.where(bad, float("nan"), out)
    o_ptrs = OUT + b.to(tl.int64) * s_ob + i * s_os + h * s_oh + dims
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=dim_ok)


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """cache[b, cache_seqlens[b] + i] = new[b, i] for i < Sq, in place (k, v: (B, Sq, Hkv, D))."""
    bsz, sq, hkv, d = k.shape
    if bsz * sq == 0:
        return
    block_h, block_d = next_pow2(hkv), next_pow2(d)
    _append_kv_kernel[(bsz * sq,)](
        k, v, k_cache, v_cache, cache_seqlens,
        sq, hkv, d, k_cache.shape[1],
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4 if block_h * block_d >= 2048 else 1,
    )  # fmt: skip


def _block_n(d: int, dtype: torch.dtype, device: torch.device) -> int:
    """Keys per loop step: a K and a V tile of ~16-32 KB each keeps two stages in flight."""
    if device.type != "cuda":
        return 16  # the interpreter pays per element: small tiles for small test shapes
    if dtype == torch.float32:
        return 64 if d <= 64 else 32
    return 128 if d <= 64 else 64


def choose_num_splits(programs: int, s_max: int, block_n: int, device: torch.device) -> int:
    """Splits so that one decode step fills the GPU: about two waves of programs, and at
    least ~4 key blocks per split for the longest possible sequence (S_max)."""
    sms = num_programs_hint(device)
    target = 2 * sms
    if programs >= target:
        return 1
    by_len = max(1, s_max // (4 * block_n))
    return max(1, min(triton.cdiv(target, programs), by_len, MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    seq_extra: int,
    causal: bool,
    softmax_scale: float,
    num_splits: int = 0,
) -> torch.Tensor:
    """Attention of q (B, Sq, H, D) over cache rows [0, cache_seqlens[b] + seq_extra).

    ``seq_extra`` is Sq when the new keys were just appended, else 0. ``num_splits`` 0
    picks the split count automatically. Returns out (B, Sq, H, D) in q's dtype.
    """
    bsz, sq, h, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    group = h // hkv
    out = torch.empty((bsz, sq, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_d = max(16, next_pow2(d))
    block_n = _block_n(d, q.dtype, q.device)
    rows = sq * group
    # tl.dot needs at least 16 rows; cap the rows per program so registers stay bounded
    # (more query rows go to more programs along grid axis 2).
    block_m = min(max(16, next_pow2(rows)), 64 if block_d <= 128 else 32)
    row_blocks = triton.cdiv(rows, block_m)
    if num_splits <= 0:
        num_splits = choose_num_splits(bsz * hkv * row_blocks, s_max, block_n, q.device)
    num_splits = min(num_splits, MAX_SPLITS)
    if num_splits > 1:
        o_part = torch.empty((bsz, sq, h, num_splits, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((bsz, sq, h, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # unused: the split kernel writes out directly
    num_warps = 4 if block_d <= 128 else 8
    _decode_split_kernel[(bsz * hkv, num_splits, row_blocks)](
        q, k_cache, v_cache, cache_seqlens, out, o_part, lse_part,
        sq, h, hkv, d, s_max, seq_extra, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, CAUSAL=causal, NUM_SPLITS=num_splits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=fp32_dot_precision(q.dtype), num_warps=num_warps,
        num_stages=3 if block_d <= 128 else 2,
    )  # fmt: skip
    if num_splits > 1:
        _decode_combine_kernel[(bsz * sq * h,)](
            o_part, lse_part, cache_seqlens, out,
            sq, h, d, s_max, seq_extra, out.stride(0), out.stride(1), out.stride(2),
            NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d,
            num_warps=4 if block_d * next_pow2(num_splits) >= 4096 else 2,
        )  # fmt: skip
    return out
