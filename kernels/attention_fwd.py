"""Flash attention forward (FlashAttention-2 scheme) for padded and packed batches.

For one (sequence b, query head h, block of BLOCK_M queries) a program streams the keys
and values of kv head h // (H // Hkv) in blocks of BLOCK_N and keeps, per query row i,

    m_i = running max of S[i, :] * log2(e)        S = scale * q k^T  (fp32 dots)
    l_i = running sum of 2^(S log2 e - m_i)       (the softmax denominator, before dropout)
    acc = running sum of 2^(S log2 e - m_i) * Z / (1 - p) * v      Z: dropout keep-mask

rescaling l and acc by 2^(m_old - m_new) when the max grows (online softmax in the log2
domain: scale * log2(e) is folded into one multiply so exp2 replaces exp). At the end

    O[i]   = acc / l_i                            (0 when row i sees no key)
    lse2[i] = m_i + log2 l_i                      (+inf when row i sees no key)

lse2 is the log-sum-exp in base 2 (lse * log2 e). It is kept in that unit for the
backward: there P = 2^(S log2 e - lse2) with S log2 e recomputed exactly as here, and the
large terms cancel without an extra rounding of a ~1e4-sized exponent (storing the
natural lse and converting back costs ~1e-3 relative in P when logits reach 1e4).

Masks: keys j >= Sk, causal j > i + Sk - Sq (bottom-right), key_padding_mask[b, j] False.
Key blocks every query of the block fully sees run a mask-free loop; only the diagonal
and the ragged last block pay for the mask (the same inner function, MASKED constexpr).

Shapes: q (B, Sq, H, D) / k, v (B, Sk, Hkv, D) with any strides (last dim contiguous), or
packed q (total_q, H, D), k, v (total_k, Hkv, D) with cu_seqlens (IS_VARLEN). O is
contiguous like q; lse2 fp32 (B, H, Sq) or (H, total_q). D is padded to BLOCK_D (a power
of two) with masked loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels._autotune import autotune, launch
from fastlm.kernels._launch import fp32_dot_precision
from fastlm.kernels.attention_common import (
    LOG2E,
    configs,
    dropout_keep,
    flat_grid,
    head_block,
    kv_block_range,
    layout_strides,
    load_rows,
    lse_strides,
    pruner,
    seq_bounds,
    seq_bucket,
    split_pid,
    store_rows,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on the GPU, best-first for long sequences;
# pruned by shared memory and registers (attention_common.pruner).
_GPU_CONFIGS = [
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 32, 4, 3),
]


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K, V, KPM, offs_m, offs_d, rng_rows,
    stride_kn, stride_vn, stride_mk,
    start, end, k_len, shift, qk_scale, seed, seq_k_rng, dropout_p,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Key blocks [start, end) into the running (acc, l_i, m_i). K, V, KPM point at this
    sequence's first key (and kv head); MASKED applies the bounds and causal masks."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        kt = tl.load(
            K + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )  # fmt: skip
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            valid = n_ok[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(valid, s, float("-inf"))
        if HAS_MASK:
            attend = tl.load(KPM + offs_n * stride_mk, mask=n_ok, other=0)
            s = tl.where(attend[None, :] != 0, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet has m = -inf: shift by 0 instead (no inf - inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(
                seed, rng_rows[:, None], offs_n.to(tl.int64)[None, :], seq_k_rng, dropout_p
            )
            p = tl.where(keep, p, 0.0)
        v = load_rows(V, offs_n.to(tl.int64), n_ok, stride_vn, offs_d, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotune(
    configs(_GPU_CONFIGS, interp_block_m=32, interp_block_n=32),
    key=["seq_bucket", "HEAD_DIM", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "IS_VARLEN"],
    prune=pruner("fwd"),
)
@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_mb, stride_mk,
    H, GROUP, seq_q, seq_k, total_q, total_k, seq_bucket, qk_scale, dropout_p, seed,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Sq or max_seqlen_q, BLOCK_M) * B * H,), see split_pid. seq_q/seq_k: Sq/Sk
    or the max seqlens (they also key the dropout counters); total_q/total_k: the packed
    token counts that bound every sequence; seq_bucket only keys the autotuner."""
    pid_m, pid_bh = split_pid(tl.cdiv(seq_q, BLOCK_M))
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = seq_bounds(
        CU_Q, CU_K, b, seq_q, seq_k, total_q, total_k, IS_VARLEN
    )
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:  # packed batches: this sequence is shorter than max_seqlen_q
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    b64 = b.to(tl.int64)
    q_tok = q_start + offs_m
    q = load_rows(Q + b64 * stride_qb + h * stride_qh, q_tok, m_ok, stride_qs, offs_d, HEAD_DIM)
    K += b64 * stride_kb + k_start * stride_ks + hk * stride_kh
    V += b64 * stride_vb + k_start * stride_vs + hk * stride_vh
    KPM += b64 * stride_mb
    rng_rows = pid_bh.to(tl.int64) * seq_q + offs_m.to(tl.int64)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    shift = k_len - q_len
    full, end = kv_block_range(m0, q_len, k_len, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, KPM, offs_m, offs_d, rng_rows, stride_ks, stride_vs, stride_mk,
        0, full, k_len, shift, qk_scale, seed, seq_k, dropout_p,
        False, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, KPM, offs_m, offs_d, rng_rows, stride_ks, stride_vs, stride_mk,
        full, end, k_len, shift, qk_scale, seed, seq_k, dropout_p,
        True, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    store_rows(O + b64 * stride_ob + h * stride_oh, q_tok, m_ok, stride_os, offs_d, out, HEAD_DIM)
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, lse2, mask=m_ok)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded: q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out like q (contiguous), lse2 (B, H, Sq).
    Packed (cu_seqlens given): q (total_q, H, D) -> out, lse2 (H, total_q). lse2 is the
    base-2 log-sum-exp (natural lse * log2 e) that attention_bwd expects. Inputs validated
    by fastlm.ops.attention."""
    varlen = cu_seqlens_q is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        lse = torch.empty((heads, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        batch = q.shape[0]
        lse = torch.empty((batch, heads, q.shape[1]), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    has_mask = key_padding_mask is not None
    # bool tensors load as int8 (True = attend); strides are passed, no copy.
    kpm = key_padding_mask.view(torch.int8) if has_mask else lse
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse

    launch(
        _attn_fwd_kernel, flat_grid(max_seqlen_q, batch * heads, "BLOCK_M"),
        q, k, v, out, lse, kpm, cu_q, cu_k,
        *layout_strides(q, varlen), *layout_strides(k, varlen), *layout_strides(v, varlen),
        *layout_strides(out, varlen), *lse_strides(lse, varlen),
        kpm.stride(0) if has_mask else 0, kpm.stride(1) if has_mask else 0,
        heads, heads // k.shape[-2], max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0],
        seq_bucket(max(max_seqlen_q, max_seqlen_k)), softmax_scale * LOG2E, float(dropout_p), seed,
        IS_VARLEN=varlen, IS_CAUSAL=bool(causal), HAS_MASK=has_mask, HAS_DROPOUT=dropout_p > 0,
        HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), DOT_PRECISION=fp32_dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse
