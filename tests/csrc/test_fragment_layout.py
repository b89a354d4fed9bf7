"""CPU emulation of the index math of the csrc/ kernels (no GPU, no nvcc: numpy only).

The CUDA kernels cannot run here, so the parts where a wrong index gives wrong numbers
(not a crash) are modelled lane by lane and checked against plain numpy:

- PTX models written from the PTX ISA text, independently of the kernels:
  ``mma.sync.m16n8k16`` fragments (groupID = lane >> 2, threadID_in_group = lane % 4; A rows
  g / g+8, cols 2t(+1) / +8; B k-rows 2t(+1) / +8, col g; C rows g / g+8, cols 2t(+1)) and
  ``ldmatrix.m8n8.x4[.trans]`` (lanes 8i..8i+7 address the rows of matrix i; lane l gets
  row l/4, cols 2(l%4)(+1), or with .trans col l/4, rows 2(l%4)(+1)).
- Transcriptions of the kernels' per-lane formulas (attention_fwd.cu: ldmatrix addresses
  of Q, K, V, the S -> P register re-pack, masks, online softmax with quad shuffles,
  epilogue; attention_decode.cu: key groups, splits by actual length, query heads sharing
  one K/V read (GQA), the group merge and the lse combine;
  layer_norm.cu: launch configuration and the two-stage dweight/dbias reduction).

Each transcription must reproduce the plain-numpy result, so an index error in the kernel
formulas (copied here) fails a test. The constants they use (block sizes, thread counts,
unroll, split and row limits, head dims) are read from csrc/ itself
(tests/csrc/csrc_constants.py, csrc/fastlm_limits.h), so the model follows the kernels. Shared memory is filled with NaN before each tile
load, so a read of the 8-element row padding or of a row that was never loaded shows up
as NaN. Everything is float64: the tests check indices, not rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastlm._cuda_ext import ATTENTION_HEAD_DIMS as HEAD_DIMS  # csrc/fastlm_limits.h
from tests.csrc.csrc_constants import constants

LANES = np.arange(32)
G = LANES // 4  # groupID
TIG = LANES % 4  # threadID_in_group


# --------------------------------------------------------------------------- PTX models
def mma_m16n8k16(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """d = A @ B + C for one warp. a: (32, 4, 2) = lane x .b32 reg x (low, high) half;
    b: (32, 2, 2); c: (32, 4) fp32 accumulators. Layouts from the PTX ISA ("Matrix
    Fragments for mma.m16n8k16 with floating point type")."""
    A = np.full((16, 16), np.nan)
    for i in range(8):  # a_i lives in register i // 2, half i % 2
        row = G if (i < 2 or 4 <= i < 6) else G + 8
        col = TIG * 2 + (i & 1) + (8 if i >= 4 else 0)
        A[row, col] = a[:, i // 2, i % 2]
    B = np.full((16, 8), np.nan)
    for i in range(4):
        row = TIG * 2 + (i & 1) + (8 if i >= 2 else 0)
        B[row, G] = b[:, i // 2, i % 2]
    C = np.full((16, 8), np.nan)
    for i in range(4):
        C[np.where(i < 2, G, G + 8), TIG * 2 + (i & 1)] = c[:, i]
    D = A @ B + C
    return np.stack([D[np.where(i < 2, G, G + 8), TIG * 2 + (i & 1)] for i in range(4)], 1)


def ldmatrix_x4(smem: np.ndarray, addr: np.ndarray, trans: bool = False) -> np.ndarray:
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 for one warp.

    smem: flat array of 16-bit elements; addr: (32,) element offset given by each lane.
    Returns (32, 4, 2): lane x destination register (matrix i) x (low, high) half.
    """
    assert np.all(addr % 8 == 0), "ldmatrix row addresses must be 16-byte aligned"
    out = np.empty((32, 4, 2))
    for i in range(4):
        rows = np.stack([smem[addr[8 * i + r] : addr[8 * i + r] + 8] for r in range(8)])
        for h in range(2):
            out[:, i, h] = rows[TIG * 2 + h, G] if trans else rows[G, TIG * 2 + h]
    return out


def banks_conflict_free(addr: np.ndarray, elem_bytes: int = 2) -> bool:
    """Each 8-lane phase of ldmatrix reads 8 rows of 16 bytes: conflict-free when the
    8 rows cover all 32 four-byte banks once."""
    for i in range(4):
        banks = set()
        for r in range(8):
            word = addr[8 * i + r] * elem_bytes // 4
            banks.update((word + w) % 32 for w in range(4))
        if len(banks) != 32:
            return False
    return True


def shfl_xor(v: np.ndarray, mask: int) -> np.ndarray:
    return v[LANES ^ mask]


# ------------------------------------------------ attention_fwd.cu, transcribed per lane
_FWD = constants("attention_fwd.cu")
BM, BN, WARPS = _FWD["kBM"], _FWD["kBN"], _FWD["kWarps"]
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def q_addr(warp: int, ks: int, ld: int) -> np.ndarray:  # attention_fwd.cu, Q ldmatrix
    r = warp * 16 + (LANES % 8) + ((LANES // 8) % 2) * 8
    return r * ld + ks * 16 + (LANES // 16) * 8


def k_addr(p: int, ks: int, ld: int) -> np.ndarray:  # K ldmatrix (non-trans)
    key = p * 16 + (LANES % 8) + (LANES // 16) * 8
    return key * ld + ks * 16 + ((LANES // 8) % 2) * 8


def v_addr(kk: int, dp: int, ld: int) -> np.ndarray:  # V ldmatrix.trans
    key = kk * 16 + (LANES % 8) + ((LANES // 8) % 2) * 8
    return key * ld + dp * 16 + (LANES // 16) * 8


def load_tile(rows_src: np.ndarray, rows: int, valid: int, ld: int) -> np.ndarray:
    """cp.async tile load: rows < valid copied, others zero-filled, padding untouched (NaN)."""
    d = rows_src.shape[1]
    smem = np.full((rows, ld), np.nan)
    smem[:, :d] = 0.0
    n = max(0, min(valid, rows))
    smem[:n, :d] = rows_src[:n]
    return smem.reshape(-1)


def attention_block(q, k, v, m0, causal, kpm, scale):
    """One thread block of attention_fwd_kernel (all 8 warps); q (sq, D) of this (b, h),
    k/v (sk, D). Returns {row: (o_row, lse)} for the rows the block stores."""
    sq, D = q.shape
    sk = k.shape[0]
    ld, NT, DT = D + 8, BN // 8, D // 8
    m_end = min(m0 + BM, sq)
    diag = sk - sq
    n_end = sk
    if causal and m_end + diag < n_end:
        n_end = m_end + diag
    n_blocks = math.ceil(n_end / BN) if n_end > 0 else 0
    scale_log2 = scale * LOG2E
    sQ = load_tile(q[m0:], BM, sq - m0, ld)
    out = {}
    for warp in range(WARPS):
        rows = [m0 + warp * 16 + G, m0 + warp * 16 + G + 8]
        acc = np.zeros((DT, 32, 4))
        m_run = [np.full(32, -np.inf), np.full(32, -np.inf)]
        l_run = [np.zeros(32), np.zeros(32)]
        qf = [ldmatrix_x4(sQ, q_addr(warp, ks, ld)) for ks in range(D // 16)] if n_blocks else []
        for j in range(n_blocks):
            n0 = j * BN
            sK = load_tile(k[n0:], BN, sk - n0, ld)
            sV = load_tile(v[n0:], BN, sk - n0, ld)
            s = np.zeros((NT, 32, 4))
            for ks in range(D // 16):
                for p in range(NT // 2):
                    kb = ldmatrix_x4(sK, k_addr(p, ks, ld))
                    s[2 * p] = mma_m16n8k16(qf[ks], kb[:, 0:2], s[2 * p])
                    s[2 * p + 1] = mma_m16n8k16(qf[ks], kb[:, 2:4], s[2 * p + 1])
            need_mask = n0 + BN > sk or kpm is not None or (causal and n0 + BN - 1 > m0 + diag)
            for t in range(NT):
                for e in range(4):
                    x = s[t][:, e] * scale_log2
                    if need_mask:
                        col = n0 + t * 8 + (LANES % 4) * 2 + (e % 2)
                        row = rows[e // 2]
                        ok = col < sk
                        if causal:
                            ok &= col <= row + diag
                        if kpm is not None:
                            ok &= kpm[np.minimum(col, sk - 1)] & (col < sk)
                        x = np.where(ok, x, -np.inf)
                    s[t][:, e] = x
            alpha = [None, None]
            for r in range(2):
                mx = np.full(32, -np.inf)
                for t in range(NT):
                    mx = np.maximum(mx, np.maximum(s[t][:, 2 * r], s[t][:, 2 * r + 1]))
                mx = np.maximum(mx, shfl_xor(mx, 1))
                mx = np.maximum(mx, shfl_xor(mx, 2))
                m_new = np.maximum(m_run[r], mx)
                m_use = np.where(m_new == -np.inf, 0.0, m_new)
                alpha[r] = np.exp2(m_run[r] - m_use)
                total = np.zeros(32)
                for t in range(NT):
                    s[t][:, 2 * r] = np.exp2(s[t][:, 2 * r] - m_use)
                    s[t][:, 2 * r + 1] = np.exp2(s[t][:, 2 * r + 1] - m_use)
                    total += s[t][:, 2 * r] + s[t][:, 2 * r + 1]
                l_run[r] = l_run[r] * alpha[r] + total
                m_run[r] = m_new
            for t in range(DT):
                acc[t][:, 0:2] *= alpha[0][:, None]
                acc[t][:, 2:4] *= alpha[1][:, None]
            for kk in range(BN // 16):
                pa = np.stack(
                    [
                        np.stack([s[2 * kk][:, 0], s[2 * kk][:, 1]], 1),
                        np.stack([s[2 * kk][:, 2], s[2 * kk][:, 3]], 1),
                        np.stack([s[2 * kk + 1][:, 0], s[2 * kk + 1][:, 1]], 1),
                        np.stack([s[2 * kk + 1][:, 2], s[2 * kk + 1][:, 3]], 1),
                    ],
                    1,
                )
                for dp in range(D // 16):
                    vb = ldmatrix_x4(sV, v_addr(kk, dp, ld), trans=True)
                    acc[2 * dp] = mma_m16n8k16(pa, vb[:, 0:2], acc[2 * dp])
                    acc[2 * dp + 1] = mma_m16n8k16(pa, vb[:, 2:4], acc[2 * dp + 1])
        for r in range(2):
            lsum = l_run[r] + shfl_xor(l_run[r], 1)
            lsum = lsum + shfl_xor(lsum, 2)
            inv = np.where(lsum > 0, 1.0 / np.where(lsum > 0, lsum, 1.0), 0.0)
            for lane in range(32):
                row = int(rows[r][lane])
                if row >= sq:
                    continue
                o_row = out.setdefault(row, [np.full(D, np.nan), None])
                for t in range(DT):
                    col = t * 8 + (lane % 4) * 2
                    o_row[0][col] = acc[t][lane, 2 * r] * inv[lane]
                    o_row[0][col + 1] = acc[t][lane, 2 * r + 1] * inv[lane]
                if lane % 4 == 0:
                    lse = (
                        (m_run[r][lane] + math.log2(lsum[lane])) * LN2
                        if lsum[lane] > 0
                        else math.inf
                    )
                    o_row[1] = lse
    return out


def attention_kernel(q, k, v, causal, kpm, scale):
    """All blocks of one (batch, head): (o (sq, D), lse (sq,))."""
    sq, D = q.shape
    o = np.full((sq, D), np.nan)
    lse = np.full(sq, np.nan)
    for m0 in range(0, sq, BM):
        for row, (o_row, row_lse) in attention_block(q, k, v, m0, causal, kpm, scale).items():
            o[row], lse[row] = o_row, row_lse
    return o, lse


def attention_reference(q, k, v, causal, kpm, scale):
    sq, sk = q.shape[0], k.shape[0]
    s = scale * q @ k.T
    ok = np.ones((sq, sk), bool)
    if causal:
        ok &= np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
    if kpm is not None:
        ok &= kpm[None, :]
    s = np.where(ok, s, -np.inf)
    mx = s.max(1, keepdims=True, initial=-np.inf)
    has = np.isfinite(mx[:, 0])
    p = np.where(ok, np.exp(s - np.where(has[:, None], mx, 0.0)), 0.0)
    lsum = p.sum(1)
    o = np.where(has[:, None], p @ v / np.where(has, lsum, 1.0)[:, None], 0.0)
    lse = np.where(has, np.log(np.where(has, lsum, 1.0)) + np.where(has, mx[:, 0], 0.0), np.inf)
    return o, lse


# --------------------------------------------------------------------------- PTX tests
def test_mma_model_is_a_matmul():
    """The spec model itself: fragments built from the spec formulas multiply correctly."""
    rng = np.random.default_rng(0)
    A, B, C = (
        rng.standard_normal((16, 16)),
        rng.standard_normal((16, 8)),
        rng.standard_normal((16, 8)),
    )
    a = np.stack([np.stack([A[np.where(i < 2 or 4 <= i < 6, G, G + 8), TIG * 2 + (i & 1) + 8 * (i >= 4)]
                            for i in (2 * r, 2 * r + 1)], 1) for r in range(4)], 1)  # fmt: skip
    b = np.stack([np.stack([B[TIG * 2 + (i & 1) + 8 * (i >= 2), G] for i in (2 * r, 2 * r + 1)], 1)
                  for r in range(2)], 1)  # fmt: skip
    c = np.stack([C[np.where(i < 2, G, G + 8), TIG * 2 + (i & 1)] for i in range(4)], 1)
    d = mma_m16n8k16(a, b, c)
    D = A @ B + C
    for i in range(4):
        np.testing.assert_allclose(d[:, i], D[np.where(i < 2, G, G + 8), TIG * 2 + (i & 1)])


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_ldmatrix_q_k_gives_qk_transposed(D):
    """Q fragments (ldmatrix x4) times K fragments (ldmatrix x4, no trans), with the
    kernel's lane addresses, give S = Q K^T in the C layout, for every ks / n-tile pair."""
    ld = D + 8
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((BM, D)), rng.standard_normal((BN, D))
    sQ, sK = load_tile(q, BM, BM, ld), load_tile(k, BN, BN, ld)
    ref = q @ k.T
    for warp in range(WARPS):
        s = np.zeros((BN // 8, 32, 4))
        for ks in range(D // 16):
            qf = ldmatrix_x4(sQ, q_addr(warp, ks, ld))
            for p in range(BN // 16):
                kb = ldmatrix_x4(sK, k_addr(p, ks, ld))
                s[2 * p] = mma_m16n8k16(qf, kb[:, 0:2], s[2 * p])
                s[2 * p + 1] = mma_m16n8k16(qf, kb[:, 2:4], s[2 * p + 1])
        for t in range(BN // 8):
            for e in range(4):
                row = warp * 16 + G + 8 * (e // 2)
                col = t * 8 + TIG * 2 + (e % 2)
                np.testing.assert_allclose(s[t][:, e], ref[row, col], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_p_repack_and_ldmatrix_trans_give_pv(D):
    """S accumulators re-packed as A fragments (two C tiles -> one A tile) times V through
    ldmatrix.trans give P V in the C layout of O."""
    ld = D + 8
    rng = np.random.default_rng(2)
    P, v = rng.standard_normal((16, BN)), rng.standard_normal((BN, D))
    sV = load_tile(v, BN, BN, ld)
    # P in the C layout of S (n-tile t covers keys 8t..8t+7), as the QK^T mma leaves it.
    s = np.stack([np.stack([P[np.where(e < 2, G, G + 8), t * 8 + TIG * 2 + (e % 2)] for e in range(4)], 1)
                  for t in range(BN // 8)])  # fmt: skip
    acc = np.zeros((D // 8, 32, 4))
    for kk in range(BN // 16):
        pa = np.stack([np.stack([s[2 * kk + hi][:, 2 * lo], s[2 * kk + hi][:, 2 * lo + 1]], 1)
                       for hi, lo in ((0, 0), (0, 1), (1, 0), (1, 1))], 1)  # fmt: skip
        for dp in range(D // 16):
            vb = ldmatrix_x4(sV, v_addr(kk, dp, ld), trans=True)
            acc[2 * dp] = mma_m16n8k16(pa, vb[:, 0:2], acc[2 * dp])
            acc[2 * dp + 1] = mma_m16n8k16(pa, vb[:, 2:4], acc[2 * dp + 1])
    ref = P @ v
    for t in range(D // 8):
        for e in range(4):
            np.testing.assert_allclose(
                acc[t][:, e], ref[np.where(e < 2, G, G + 8), t * 8 + TIG * 2 + (e % 2)], atol=1e-12
            )


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_padded_rows_make_ldmatrix_conflict_free(D):
    """Rows padded to D + 8 elements: every 8-address phase of each ldmatrix in the kernel
    hits 32 distinct banks (the padding is the only 'swizzle'; nothing to undo on read)."""
    ld = D + 8
    addrs = [q_addr(w, ks, ld) for w in range(WARPS) for ks in range(D // 16)]
    addrs += [k_addr(p, ks, ld) for p in range(BN // 16) for ks in range(D // 16)]
    addrs += [v_addr(kk, dp, ld) for kk in range(BN // 16) for dp in range(D // 16)]
    assert all(banks_conflict_free(a) for a in addrs)
    # and cp.async's 16-byte destinations: row starts and tile bases are 16-byte multiples
    assert (ld * 2) % 16 == 0 and (BM * ld * 2) % 16 == 0 and (BN * ld * 2) % 16 == 0


# ------------------------------------------------------------- whole attention block
CASES = [
    # sq, sk, causal, with padding mask
    (17, 17, False, False),
    (17, 17, True, False),
    (1, 70, True, False),
    (130, 129, False, True),
    (130, 129, True, False),
    (70, 5, True, False),  # sq > sk: bottom-right causal leaves the first rows without keys
    (3, 0, False, False),  # no keys at all
    (20, 64, True, True),
]


@pytest.mark.parametrize("sq,sk,causal,masked", CASES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_attention_kernel_emulation_matches_reference(sq, sk, causal, masked, D):
    if D == 128 and sq > 64:
        pytest.skip("the long shapes run at D=64 only (CPU time); D=128 covers short ones")
    rng = np.random.default_rng(sq * 1000 + sk)
    q, k, v = (
        rng.standard_normal((sq, D)),
        rng.standard_normal((sk, D)),
        rng.standard_normal((sk, D)),
    )
    kpm = None
    if masked:
        kpm = rng.random(sk) > 0.3
        kpm[: min(sk, 3)] = False  # a masked prefix: the first tile's first keys are masked
    scale = 1.0 / math.sqrt(D)
    o, lse = attention_kernel(q, k, v, causal, kpm, scale)
    o_ref, lse_ref = attention_reference(q, k, v, causal, kpm, scale)
    np.testing.assert_allclose(o, o_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-9, atol=1e-12)


def test_attention_emulation_detects_a_wrong_repack():
    """The emulation is sensitive to the register re-pack: swapping the two middle A
    registers (rows g+8 and cols +8) gives wrong numbers."""
    rng = np.random.default_rng(3)
    P, v = rng.standard_normal((16, 16)), rng.standard_normal((16, 64))
    sV = load_tile(np.vstack([v, np.zeros((BN - 16, 64))]), BN, BN, 72)
    s = np.stack([np.stack([P[np.where(e < 2, G, G + 8), t * 8 + TIG * 2 + (e % 2)] for e in range(4)], 1)
                  for t in range(2)])  # fmt: skip
    wrong = np.stack([np.stack([s[hi][:, 2 * lo], s[hi][:, 2 * lo + 1]], 1)
                      for hi, lo in ((0, 0), (1, 0), (0, 1), (1, 1))], 1)  # fmt: skip
    vb = ldmatrix_x4(sV, v_addr(0, 0, 72), trans=True)
    got = mma_m16n8k16(wrong, vb[:, 0:2], np.zeros((32, 4)))
    ref = (P @ v)[G, TIG * 2]
    assert not np.allclose(got[:, 0], ref)


# ------------------------------------------------------- attention_decode.cu, per block
_DEC = constants("attention_decode.cu")
DEC_THREADS, DEC_UNROLL, DEC_MAX_QPB = _DEC["kThreads"], _DEC["kUnroll"], _DEC["kMaxHeadsPerBlock"]
DEC_MAX_SPLITS = _DEC["kMaxSplits"]


def decode_heads_per_block(heads, kv_heads):  # heads_per_block()
    group = max(1, heads // max(1, kv_heads))
    qpb = 1
    while qpb < group and qpb < DEC_MAX_QPB:
        qpb *= 2
    return qpb


def decode_num_splits(batch, seqlen_q, heads, kv_heads, cache_len, sm_count):
    qpb = decode_heads_per_block(heads, kv_heads)
    blocks = max(1, batch * seqlen_q * kv_heads * math.ceil(heads // max(1, kv_heads) / qpb))
    want = math.ceil(2 * max(sm_count, 1) / blocks)
    cap = max(1, math.ceil(cache_len / 256))
    return int(min(max(min(want, cap), 1), DEC_MAX_SPLITS))


def decode_split_range(end, split, splits, D):
    """[start, stop) of split ``split`` over a row's ``end`` visible keys."""
    step = DEC_THREADS // (D // 8) * DEC_UNROLL
    chunk = math.ceil(math.ceil(end / splits) / step) * step
    start = split * chunk
    return start, min(start + chunk, end)


def decode_split_block(qrows, kc, vc, end, split, splits, scale, reads):
    """decode_split_kernel for one (split, kv head block, b*Sq+i): qrows (QPB, D) the block's
    query heads; returns [(o (D,), lse2)] per head, lse2 in log2 units (-inf for an empty
    split). kc/vc: (cache_len, D) of this (b, kvh). Every K row the block loads is appended
    to ``reads`` (once per block, whatever QPB is)."""
    qpb, D = qrows.shape
    tpk = D // 8
    groups = DEC_THREADS // tpk
    step = groups * DEC_UNROLL
    tid = np.arange(DEC_THREADS)
    g, d0 = tid // tpk, (tid % tpk) * 8
    start, stop = decode_split_range(end, split, splits, D)
    qv = [np.stack([qrows[qh, d0 + e] for e in range(8)], 1) * scale * LOG2E for qh in range(qpb)]
    m = [np.full(DEC_THREADS, -np.inf) for _ in range(qpb)]
    lsum = [np.zeros(DEC_THREADS) for _ in range(qpb)]
    acc = [np.zeros((DEC_THREADS, 8)) for _ in range(qpb)]
    it = start
    while it < stop:
        kr, vr, oks = [], [], []
        for u in range(DEC_UNROLL):  # the block's loads: shared by its query heads
            key = it + u * groups + g
            ok = key < stop
            kk = np.where(ok, key, 0)
            reads.extend(np.unique(key[ok]).tolist())
            kr.append(np.where(ok[:, None], np.stack([kc[kk, d0 + e] for e in range(8)], 1), 0.0))
            vr.append(np.where(ok[:, None], np.stack([vc[kk, d0 + e] for e in range(8)], 1), 0.0))
            oks.append(ok)
        for qh in range(qpb):
            sc = []
            for u in range(DEC_UNROLL):
                dot = (qv[qh] * kr[u]).sum(1)
                off = tpk // 2
                while off > 0:  # __shfl_xor_sync inside the warp (groups never straddle warps)
                    dot = dot + dot[tid ^ off]
                    off //= 2
                sc.append(np.where(oks[u], dot, -np.inf))
            m_new = np.maximum(m[qh], np.max(np.stack(sc), 0))
            m_use = np.where(m_new == -np.inf, 0.0, m_new)
            alpha = np.exp2(m[qh] - m_use)
            lsum[qh], acc[qh] = lsum[qh] * alpha, acc[qh] * alpha[:, None]
            for u in range(DEC_UNROLL):
                p = np.exp2(sc[u] - m_use)
                lsum[qh] = lsum[qh] + p
                acc[qh] = acc[qh] + p[:, None] * vr[u]
            m[qh] = m_new
        it += step
    out = []
    for qh in range(qpb):  # the shared-memory merge, one head at a time
        sm_m = m[qh][tid % tpk == 0]  # one writer per group, indexed by g
        sm_l = lsum[qh][tid % tpk == 0]
        sm_acc = np.zeros((groups, D))
        for e in range(8):
            sm_acc[g, d0 + e] = acc[qh][:, e]
        big = sm_m.max()
        lt = (np.exp2(sm_m - big) * sm_l).sum() if big != -np.inf else 0.0
        o = (np.exp2(sm_m - big)[:, None] * sm_acc).sum(0) / lt if lt > 0 else np.zeros(D)
        out.append((o, big + math.log2(lt) if lt > 0 else -math.inf))
    return out


def decode_kernel(q, kc, vc, seqlens, causal, scale, splits, reads=None):
    """attention_decode(): q (B, Sq, H, D), caches (B, S, Hkv, D) -> o, lse (B, H, Sq).
    ``reads`` (a dict): (b, i, kvh) -> the key rows loaded for that row and kv head."""
    B, Sq, H, D = q.shape
    hkv, cache_len = kc.shape[2], kc.shape[1]
    group, qpb = H // hkv, decode_heads_per_block(H, hkv)
    head_blocks = math.ceil(group / qpb)
    o, lse = np.full((B, Sq, H, D), np.nan), np.full((B, H, Sq), np.nan)
    reads = {} if reads is None else reads
    for b in range(B):
        for i in range(Sq):
            end = int(seqlens[b]) - ((Sq - 1 - i) if causal else 0)
            end = min(max(end, 0), cache_len)
            for y in range(hkv * head_blocks):  # grid axis y
                kvh = y // head_blocks
                h0 = kvh * group + (y % head_blocks) * qpb
                nq = min(qpb, kvh * group + group - h0)
                heads = [h0 + qh if qh < nq else h0 for qh in range(qpb)]
                got = reads.setdefault((b, i, kvh), [])
                parts = [decode_split_block(q[b, i, heads], kc[b, :, kvh], vc[b, :, kvh], end, s,
                                            splits, scale, got) for s in range(splits)]  # fmt: skip
                for qh in range(nq):
                    h = h0 + qh
                    if splits == 1:
                        o[b, i, h] = parts[0][qh][0]
                        lse2 = parts[0][qh][1]
                        lse[b, h, i] = lse2 * LN2 if lse2 != -math.inf else math.inf
                        continue
                    lp = np.array([p[qh][1] for p in parts])  # decode_combine_kernel
                    big = lp.max()
                    w = np.exp2(lp - big) if big != -np.inf else np.zeros(splits)
                    wsum = w.sum()
                    o[b, i, h] = (
                        (w[:, None] * np.stack([p[qh][0] for p in parts])).sum(0) / wsum
                        if wsum > 0
                        else 0.0
                    )
                    lse[b, h, i] = (big + math.log2(wsum)) * LN2 if wsum > 0 else math.inf
    return o, lse


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("splits", [1, 3, 5])
@pytest.mark.parametrize(
    "H,hkv", [(4, 4), (4, 2), (4, 1), (6, 2), (6, 1)], ids=["mha", "gqa2", "mqa4", "gqa3", "mqa6"]
)  # groups of 3 and 6: a partly filled block of 4 heads, and two blocks per kv head
def test_decode_emulation_matches_reference(D, causal, splits, H, hkv):
    B, Sq, S = 3, 2, 300
    rng = np.random.default_rng(D + splits)
    q = rng.standard_normal((B, Sq, H, D))
    kc, vc = rng.standard_normal((B, S, hkv, D)), rng.standard_normal((B, S, hkv, D))
    seqlens = np.array([0, 1, 257])  # empty cache, one key (causal: row 0 sees none), ragged
    scale = 1.0 / math.sqrt(D)
    reads = {}
    o, lse = decode_kernel(q, kc, vc, seqlens, causal, scale, splits, reads)
    for b in range(B):
        for h in range(H):
            ks, vs = kc[b, : seqlens[b], h // (H // hkv)], vc[b, : seqlens[b], h // (H // hkv)]
            o_ref, lse_ref = attention_reference(q[b, :, h], ks, vs, causal, None, scale)
            np.testing.assert_allclose(o[b, :, h], o_ref, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(lse[b, h], lse_ref, rtol=1e-9, atol=1e-12)
    # GQA sharing: every visible key of a (row, kv head) is loaded once per block of up to 4
    # query heads (once for groups of 2 to 4, twice for 6), never once per query head.
    blocks = math.ceil(H // hkv / DEC_MAX_QPB)
    for (b, i, _), got in reads.items():
        end = min(max(int(seqlens[b]) - ((Sq - 1 - i) if causal else 0), 0), S)
        assert sorted(got) == sorted(list(range(end)) * blocks), (b, i, len(got), end)


def test_decode_num_splits_and_ranges_cover_the_keys():
    """Splits <= 64, and the splits of a row cover its visible keys exactly once."""
    for cache_len in [0, 1, 255, 256, 257, 5000, 1 << 20]:
        for rows, sms in [(1, 132), (64, 132), (10_000, 132)]:
            s = decode_num_splits(rows, 1, 8, 2, cache_len, sms)
            assert 1 <= s <= 64
            for end in sorted({0, 1, cache_len // 3, cache_len}):
                for D in HEAD_DIMS:
                    keys = [k for sp in range(s) for k in range(*decode_split_range(end, sp, s, D))]
                    assert keys == list(range(end)), (cache_len, s, end, D)


def test_decode_splits_follow_the_actual_length():
    """A large preallocated cache with short sequences: the splits share the real keys
    (splitting the capacity put all 300 keys of a 32 K cache in the first of 32 splits)."""
    cache_len, end, D = 32768, 300, 128
    splits = decode_num_splits(1, 1, 12, 12, cache_len, 132)
    assert splits > 8
    sizes = [len(range(*decode_split_range(end, sp, splits, D))) for sp in range(splits)]
    assert sum(sizes) == end
    step = DEC_THREADS // (D // 8) * DEC_UNROLL
    assert max(sizes) <= math.ceil(math.ceil(end / splits) / step) * step
    assert sum(1 for n in sizes if n) >= min(splits, end // step)


def test_decode_heads_per_block_shares_kv_over_the_group():
    assert [decode_heads_per_block(h, k) for h, k in [(12, 12), (8, 4), (8, 2), (32, 8), (32, 1)]] == [
        1, 2, 4, 4, 4,
    ]  # fmt: skip


# ------------------------------------------------------------------ layer_norm.cu config
LN_MAX_N = constants("fastlm_limits.h")["kLayerNormMaxN"]
KMAX_RPB = constants("layer_norm.cu")["kMaxRowsPerBlock"]
_LN = constants("layer_norm.cu")


def ln_config(n, vec, max_threads):
    nvec = math.ceil(n / vec)
    nv = 1
    while nvec > nv * max_threads:
        nv *= 2
    tpr = math.ceil(math.ceil(nvec / nv) / 32) * 32
    rpb = max(1, min(KMAX_RPB, 256 // tpr))
    return nv, tpr, rpb


def instantiated_nv(threads, vec):  # with_wt_nv's if-constexpr ladder
    cover = threads * vec
    out = {1}
    out |= {2} if cover < LN_MAX_N else set()
    out |= {4} if 2 * cover < LN_MAX_N else set()
    out |= {8} if 4 * cover < LN_MAX_N else set()
    return out


@pytest.mark.parametrize("vec", [8, 4])  # fp16/bf16, fp32
@pytest.mark.parametrize("threads", [_LN["kFwdThreads"], _LN["kBwdThreads"]])
def test_layer_norm_config_covers_every_n(vec, threads):
    """For every N <= kLayerNormMaxN: the needed NV is instantiated, the block fits, the
    shared reduction array (32 warps x 8 rows) is big enough, and the thread/vector
    assignment col = (i * tpr + t) * VEC covers every column exactly once."""
    have = instantiated_nv(threads, vec)
    for n in range(1, LN_MAX_N + 1):
        nv, tpr, rpb = ln_config(n, vec, threads)
        assert nv in have, (n, nv)
        assert (
            tpr % 32 == 0 and tpr <= threads and tpr // 32 <= 32 and tpr * rpb <= max(threads, 256)
        )
        assert rpb <= KMAX_RPB
        if n in (1, 7, 383, 384, 1000, 4097, LN_MAX_N):
            cols = np.array([(i * tpr + t) * vec for i in range(nv) for t in range(tpr)])
            covered = np.concatenate([c + np.arange(vec) for c in cols if c < n])
            assert np.array_equal(np.sort(covered[covered < n]), np.arange(n))


@pytest.mark.parametrize("rows,n", [(1, 7), (37, 1000), (300, 384)])
def test_layer_norm_backward_two_stage_reduction(rows, n):
    """ln_bwd_kernel's grid-stride over row groups, per-slot partials and column_sum give
    the full dweight/dbias sums (every slot written, none counted twice)."""
    vec, sm_count = 8, 4
    _, tpr, rpb = ln_config(n, vec, 512)
    groups = math.ceil(rows / rpb)
    per_sm = max(1, 2048 // (tpr * rpb))
    blocks = max(1, min(min(sm_count * per_sm, math.ceil(groups / 4)), groups))  # bwd_blocks
    prow = blocks * rpb
    rng = np.random.default_rng(rows)
    dy, xhat = rng.standard_normal((rows, n)), rng.standard_normal((rows, n))
    partial = np.full((2 * prow, n), np.nan)
    for blk in range(blocks):
        for y in range(rpb):
            dw, db = np.zeros(n), np.zeros(n)
            for g in range(blk, groups, blocks):
                row = g * rpb + y
                if row < rows:
                    dw += dy[row] * xhat[row]
                    db += dy[row]
            slot = blk * rpb + y
            partial[slot], partial[prow + slot] = dw, db
    assert not np.isnan(partial).any()
    np.testing.assert_allclose(partial[:prow].sum(0), (dy * xhat).sum(0), atol=1e-9)
    np.testing.assert_allclose(partial[prow:].sum(0), dy.sum(0), atol=1e-9)


# ------------------------------------------- attention_fwd.cu cp.async / barrier schedule
def fwd_schedule(n_blocks: int, drop: str | None = None) -> list[tuple]:
    """attention_fwd_kernel's shared-memory schedule as a list of events (block-uniform):
    ("issue", buf, tile) a cp.async into buf, ("commit",), ("wait", n), ("sync",),
    ("read", buf, tile). `drop` removes one labelled barrier (to show the checker fails)."""
    ev = [("issue", "Q", 0), ("issue", "K", 0), ("commit",), ("issue", "V", 0), ("commit",)]
    ev += [("wait", 1), ("sync",), ("read", "Q", 0)]
    for j in range(n_blocks):
        if j > 0:
            ev += [("wait", 1), ("sync",)]
        ev += [("read", "K", j)]
        ev += [] if drop == "after_s" else [("sync",)]
        ev += [("issue", "K", j + 1)] if j + 1 < n_blocks else []
        ev += [("commit",), ("wait", 1)]
        ev += [] if drop == "before_pv" else [("sync",)]
        ev += [("read", "V", j)]
        ev += [] if drop == "after_pv" else [("sync",)]
        ev += [("issue", "V", j + 1)] if j + 1 < n_blocks else []
        ev += [("commit",)]
    return [*ev, ("wait", 0)]


def check_schedule(events: list[tuple]) -> None:
    """Raise AssertionError on a race: a read of a tile whose cp.async group was not
    waited for and then published by a barrier, a read of a buffer that was refilled,
    an overwrite of a buffer some warp may still read (no barrier since the last read),
    or copies still in flight at exit."""
    epoch = 0  # number of __syncthreads so far
    groups: list[dict] = []  # committed groups: {"writes": [...], "done": epoch or None}
    open_writes: list[tuple] = []
    content: dict[str, tuple] = {}  # buf -> (tile, group record)
    last_read: dict[str, int] = {}
    for e in events:
        kind = e[0]
        if kind == "issue":
            _, buf, tile = e
            assert last_read.get(buf, -1) < epoch, f"{buf} overwritten while it may be read"
            rec = {"writes": [], "done": None}
            open_writes.append((buf, tile, rec))
            content[buf] = (tile, rec)
        elif kind == "commit":
            group = {"writes": open_writes, "done": None}
            for _, _, rec in open_writes:
                rec["group"] = group
            groups.append(group)
            open_writes = []
        elif kind == "wait":
            for group in groups[: max(0, len(groups) - e[1])]:
                if group["done"] is None:
                    group["done"] = epoch
        elif kind == "sync":
            epoch += 1
        elif kind == "read":
            _, buf, tile = e
            have, rec = content[buf]
            assert have == tile, f"read {buf} tile {tile} but it holds tile {have}"
            done = rec["group"]["done"]
            assert done is not None and done < epoch, f"{buf} tile {tile} read before it landed"
            last_read[buf] = epoch
    assert all(g["done"] is not None for g in groups) and not open_writes, "copies in flight"


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 7])
def test_attention_pipeline_has_no_race(n_blocks):
    check_schedule(fwd_schedule(n_blocks))


@pytest.mark.parametrize("drop", ["after_s", "before_pv", "after_pv"])
def test_pipeline_checker_catches_a_missing_barrier(drop):
    with pytest.raises(AssertionError):
        check_schedule(fwd_schedule(3, drop))
