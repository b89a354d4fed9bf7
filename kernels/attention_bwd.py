"""Flash attention backward (FlashAttention-2 recompute scheme), no atomics.

With S = scale * q k^T, P = exp(S - lse) = 2^(S log2 e - lse2) on allowed entries (0
elsewhere; lse2 is the forward's base-2 log-sum-exp, +inf on rows that see no key, so
such rows give P = 0), Z the dropout keep-mask, r = 1 / (1 - p):

    delta[i] = sum_d dO[i, d] * O[i, d]                     (_bwd_preprocess_kernel)
    dV[j]    = sum_i P[i, j] Z[i, j] r dO[i]                (_bwd_dkdv_kernel)
    dP[i, j] = Z[i, j] r (dO[i] . V[j])
    dS[i, j] = P[i, j] (dP[i, j] - delta[i])
    dK[j]    = scale * sum_i dS[i, j] q[i]                  (_bwd_dkdv_kernel)
    dQ[i]    = scale * sum_j dS[i, j] k[j]                  (_bwd_dq_kernel)

The dk/dv kernel owns a block of BLOCK_N keys of one kv head and loops over the query
blocks of every query head of its GQA group, so dK and dV are summed over the group in
registers (no atomics, deterministic). The dq kernel owns a block of BLOCK_M queries and
loops over key blocks. Both recompute P in the log2 domain (exp2, scale * log2 e folded)
and regenerate the dropout mask from the same counters as the forward. Blocks on the
causal diagonal (and ragged edges) run the masked variant of the shared loop body.

Shapes as in kernels/attention_fwd.py; dO any strides (last dim contiguous); dq, dk, dv
are contiguous like q, k, v; lse2 and delta fp32 (B, H, Sq) or (H, total_q).
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
    q_block_range,
    seq_bounds,
    seq_bucket,
    split_pid,
    store_rows,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages): dk/dv keep BLOCK_N keys resident and stream
# queries in BLOCK_M; dq keeps BLOCK_M queries and streams keys in BLOCK_N.
# The last two spread 64 keys over eight warps. At head_dim 128 (dk and dv: 2 x 64 x 128
# fp32 accumulators) every other config spills on sm_90, 32x64x8w too (8 B); 16x64x8w
# holds 206 registers (tests/kernels/test_sm90_compile.py).
_DKDV_GPU_CONFIGS = [
    (32, 128, 8, 3),
    (64, 128, 8, 3),
    (32, 64, 4, 3),
    (64, 64, 4, 2),
    (16, 64, 4, 2),
    (64, 64, 8, 2),
    (16, 64, 8, 2),
]
_DQ_GPU_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 2)]
_KEY = ["seq_bucket", "HEAD_DIM", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "IS_VARLEN"]


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh, stride_lb, stride_lh,
    H, seq_q, total_q,
    IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta[b, h, i] = rowsum(dO * O) in fp32. Grid (cdiv(Sq, BLOCK_M) * B * H,)."""
    pid_m, pid_bh = split_pid(tl.cdiv(seq_q, BLOCK_M))
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len, _, _ = seq_bounds(CU_Q, CU_Q, b, seq_q, seq_q, total_q, total_q, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    b64 = b.to(tl.int64)
    tok = q_start + offs_m
    o = load_rows(O + b64 * stride_ob + h * stride_oh, tok, m_ok, stride_os, offs_d, HEAD_DIM)
    do = load_rows(DO + b64 * stride_db + h * stride_dh, tok, m_ok, stride_ds, offs_d, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + tok, delta, mask=m_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, Q, DO, LSE, DELTA, attend, offs_n, offs_d, rng_b,
    stride_qs, stride_ds, start, end, q_len, shift, qk_scale, seed, seq_q_rng, seq_k_rng, dropout_p,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Query blocks [start, end) of one query head into dk, dv ([BLOCK_N, BLOCK_D] fp32).
    Tiles are transposed: rows are keys, columns queries. Q, DO, LSE, DELTA point at this
    sequence and head; rng_b = (b * H + h) * Sq_rng."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        tok = offs_m.to(tl.int64)
        q = load_rows(Q, tok, m_ok, stride_qs, offs_d, HEAD_DIM)
        do = load_rows(DO, tok, m_ok, stride_ds, offs_d, HEAD_DIM)
        # Rows past the sequence load lse2 = +inf: their P is exactly 0.
        lse2 = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)

        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [N, M]
        if MASKED and IS_CAUSAL:
            st = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, st, float("-inf"))
        if HAS_MASK:
            st = tl.where(attend[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse2[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            rows = rng_b + offs_m.to(tl.int64)
            keep = dropout_keep(
                seed, rows[None, :], offs_n.to(tl.int64)[:, None], seq_k_rng, dropout_p
            )
            rp = 1.0 / (1.0 - dropout_p)
            pdt = tl.where(keep, pt * rp, 0.0)
            dpt = tl.where(keep, dpt * rp, 0.0)
        else:
            pdt = pt
        dv += tl.dot(pdt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@autotune(
    configs(_DKDV_GPU_CONFIGS, interp_block_m=32, interp_block_n=32),
    key=_KEY,
    prune=pruner("dkdv"),
)
@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_mb, stride_mk,
    H, GROUP, seq_q, seq_k, total_q, total_k, seq_bucket, qk_scale, softmax_scale, dropout_p,
    seed,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Sk, BLOCK_N) * B * Hkv,)."""
    pid_n, pid_bh = split_pid(tl.cdiv(seq_k, BLOCK_N))
    hkv = H // GROUP
    b = pid_bh // hkv
    hk = pid_bh % hkv
    q_start, q_len, k_start, k_len = seq_bounds(
        CU_Q, CU_K, b, seq_q, seq_k, total_q, total_k, IS_VARLEN
    )
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    k_tok = k_start + offs_n
    k = load_rows(K + b64 * stride_kb + hk * stride_kh, k_tok, n_ok, stride_ks, offs_d, HEAD_DIM)
    v = load_rows(V + b64 * stride_vb + hk * stride_vh, k_tok, n_ok, stride_vs, offs_d, HEAD_DIM)
    if HAS_MASK:
        attend = tl.load(KPM + b64 * stride_mb + offs_n * stride_mk, mask=n_ok, other=0) != 0
    else:
        attend = n_ok
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    shift = k_len - q_len
    lo, mid = q_block_range(n0, q_len, k_len, IS_CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
        do_base = DO + b64 * stride_db + h * stride_dh + q_start * stride_ds
        lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
        rng_b = (b64 * H + h) * seq_q
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, attend, offs_n, offs_d, rng_b,
            stride_qs, stride_ds, lo, mid, q_len, shift, qk_scale, seed, seq_q, seq_k, dropout_p,
            True, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, HEAD_DIM, BLOCK_M, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, attend, offs_n, offs_d, rng_b,
            stride_qs, stride_ds, mid, q_len, q_len, shift, qk_scale, seed, seq_q, seq_k, dropout_p,
            False, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, HEAD_DIM, BLOCK_M, DOT_PRECISION,
        )  # fmt: skip
    dk = dk * softmax_scale
    dk_base = DK + b64 * stride_dkb + hk * stride_dkh
    store_rows(dk_base, k_tok, n_ok, stride_dks, offs_d, dk, HEAD_DIM)
    store_rows(
        DV + b64 * stride_dvb + hk * stride_dvh, k_tok, n_ok, stride_dvs, offs_d, dv, HEAD_DIM
    )


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, K, V, KPM, offs_m, offs_d, rng_rows,
    stride_kn, stride_vn, stride_mk, start, end, k_len, shift, qk_scale, seed, seq_k_rng, dropout_p,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Key blocks [start, end) into dq ([BLOCK_M, BLOCK_D] fp32, unscaled)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        ld = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(
            K + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None], mask=ld, other=0.0
        )
        vt = tl.load(
            V + offs_n[None, :].to(tl.int64) * stride_vn + offs_d[:, None], mask=ld, other=0.0
        )
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            valid = n_ok[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(valid, s, float("-inf"))
        if HAS_MASK:
            attend = tl.load(KPM + offs_n * stride_mk, mask=n_ok, other=0)
            s = tl.where(attend[None, :] != 0, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(
                seed, rng_rows[:, None], offs_n.to(tl.int64)[None, :], seq_k_rng, dropout_p
            )
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@autotune(
    configs(_DQ_GPU_CONFIGS, interp_block_m=32, interp_block_n=32),
    key=_KEY,
    prune=pruner("dq"),
)
@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KPM, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
    stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, stride_mb, stride_mk,
    H, GROUP, seq_q, seq_k, total_q, total_k, seq_bucket, qk_scale, softmax_scale, dropout_p,
    seed,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Sq, BLOCK_M) * B * H,)."""
    pid_m, pid_bh = split_pid(tl.cdiv(seq_q, BLOCK_M))
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = seq_bounds(
        CU_Q, CU_K, b, seq_q, seq_k, total_q, total_k, IS_VARLEN
    )
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    tok = q_start + offs_m
    q = load_rows(Q + b64 * stride_qb + h * stride_qh, tok, m_ok, stride_qs, offs_d, HEAD_DIM)
    do = load_rows(DO + b64 * stride_db + h * stride_dh, tok, m_ok, stride_ds, offs_d, HEAD_DIM)
    stat = b64 * stride_lb + h * stride_lh + tok
    lse2 = tl.load(LSE + stat, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + stat, mask=m_ok, other=0.0)
    K += b64 * stride_kb + k_start * stride_ks + hk * stride_kh
    V += b64 * stride_vb + k_start * stride_vs + hk * stride_vh
    KPM += b64 * stride_mb
    rng_rows = pid_bh.to(tl.int64) * seq_q + offs_m.to(tl.int64)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    shift = k_len - q_len
    full, end = kv_block_range(m0, q_len, k_len, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(
        dq, q, do, lse2, delta, K, V, KPM, offs_m, offs_d, rng_rows, stride_ks, stride_vs, stride_mk,
        0, full, k_len, shift, qk_scale, seed, seq_k, dropout_p,
        False, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, K, V, KPM, offs_m, offs_d, rng_rows, stride_ks, stride_vs, stride_mk,
        full, end, k_len, shift, qk_scale, seed, seq_k, dropout_p,
        True, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = dq * softmax_scale
    store_rows(DQ + b64 * stride_dqb + h * stride_dqh, tok, m_ok, stride_dqs, offs_d, dq, HEAD_DIM)


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), contiguous in the layouts of q, k, v. ``out``/``lse`` (base 2)
    from attention_fwd; ``seed`` the forward's dropout seed."""
    varlen = cu_seqlens_q is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if k.numel() == 0 or q.numel() == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        # No query or no key: every gradient is zero.
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        # Autograd may hand over an expanded or transposed gradient (e.g. of out.sum()):
        # the kernels need a unit-stride head dim, any other stride is passed through.
        dout = dout.contiguous()
    delta = torch.empty_like(lse)
    block_d = head_block(head_dim)
    pre_block = 32
    _bwd_preprocess_kernel[(triton.cdiv(max_seqlen_q, pre_block) * batch * heads,)](
        out, dout, delta, cu_seqlens_q if varlen else lse,
        *layout_strides(out, varlen), *layout_strides(dout, varlen), *lse_strides(lse, varlen),
        heads, max_seqlen_q, q.shape[0],
        IS_VARLEN=varlen, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_block,
    )  # fmt: skip

    has_mask = key_padding_mask is not None
    kpm = key_padding_mask.view(torch.int8) if has_mask else lse
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    group = heads // k.shape[-2]
    common = dict(
        IS_VARLEN=varlen, IS_CAUSAL=bool(causal), HAS_MASK=has_mask, HAS_DROPOUT=dropout_p > 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=fp32_dot_precision(q.dtype),
    )  # fmt: skip
    mask_strides = (kpm.stride(0), kpm.stride(1)) if has_mask else (0, 0)
    scalars = (
        heads, group, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0],
        seq_bucket(max(max_seqlen_q, max_seqlen_k)),
        softmax_scale * LOG2E, softmax_scale, float(dropout_p), seed,
    )  # fmt: skip
    qkv_strides = (
        *layout_strides(q, varlen),
        *layout_strides(k, varlen),
        *layout_strides(v, varlen),
    )

    launch(
        _bwd_dkdv_kernel, flat_grid(max_seqlen_k, batch * k.shape[-2], "BLOCK_N"),
        q, k, v, dout, dk, dv, lse, delta, kpm, cu_q, cu_k,
        *qkv_strides, *layout_strides(dout, varlen),
        *layout_strides(dk, varlen), *layout_strides(dv, varlen), *lse_strides(lse, varlen),
        *mask_strides, *scalars, **common,
    )  # fmt: skip
    launch(
        _bwd_dq_kernel, flat_grid(max_seqlen_q, batch * heads, "BLOCK_M"),
        q, k, v, dout, dq, lse, delta, kpm, cu_q, cu_k,
        *qkv_strides, *layout_strides(dout, varlen), *layout_strides(dq, varlen),
        *lse_strides(lse, varlen), *mask_strides, *scalars, **common,
    )  # fmt: skip
    # With valid cu_seqlens every row was written; with invalid ones (unchecked on CUDA)
    # the caller sets the gradients to NaN (kernels/attention_common.nan_if_invalid_cu_seqlens).
    return dq, dk, dv
