"""Pieces shared by the attention forward and backward kernels.

* ``dropout_keep``: the counter-based dropout RNG. Element (b, h, i, j) of the attention
  matrix keeps its probability when u >= p, where u in [0, 1) is Philox-4x32 of the
  64-bit counter  offset = ((b * H + h) * Sq + i) * Sk + j  under the 64-bit seed. A pure
  function of (seed, offset): the forward, both backward kernels and the debug
  ``dropout_keep_mask`` all call this one function and so agree bit for bit. The counter
  is split into two 32-bit words explicitly so the stream is the same on every Triton
  version (tl.rand's handling of int64 offsets changed between releases).
* ``seq_bounds``: where sequence b starts and how long it is, padded or packed (IS_VARLEN),
  clamped into the tensors whatever cu_seqlens holds; ``nan_if_invalid_cu_seqlens`` gives
  invalid offsets their defined result (NaN outputs).
* ``load_rows`` / ``store_rows``: a [rows, head_dim] tile of q, k, v, o or a gradient, masked
  on the row bounds and the head-dim padding.
* ``kv_block_range`` / ``q_block_range``: which key blocks a query block must visit (and
  which of them need no causal or bounds mask), and the converse for the dk/dv kernel.
* launcher helpers: layout strides, the config lists (one config under the interpreter) and
  their pruning by shared memory and registers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastlm.kernels._autotune import regs_per_thread

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def dropout_keep(seed, rows, cols, seq_k, p):
    """Keep-mask for a tile. rows: int64 (b * H + h) * Sq + i, cols: int64 j, broadcast
    against each other to the tile shape; seq_k: Sk. Returns u >= p (bool tile)."""
    offs = rows * seq_k + cols
    lo = (offs & 0xFFFFFFFF).to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    zero = lo * 0
    r, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def _span(CU, b, total, max_len):
    """(start int64, len) of packed sequence b, clamped: start and end into [0, total],
    end >= start, len <= max_len (what the grid covers). Valid cu_seqlens pass unchanged;
    wrong ones can never make a kernel touch a row outside the tensor."""
    start = tl.minimum(tl.maximum(tl.load(CU + b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), total)
    return start.to(tl.int64), tl.minimum(end - start, max_len)


@triton.jit
def seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, total_q, total_k, IS_VARLEN: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of sequence b (starts int64): packed from cu_seqlens
    (contiguous, clamped into total_q / total_k tokens and the max seqlens seq_q / seq_k),
    or the padded batch (start 0, lengths Sq and Sk)."""
    if IS_VARLEN:
        q_start, q_len = _span(CU_Q, b, total_q, seq_q)
        k_start, k_len = _span(CU_K, b, total_k, seq_k)
    else:
        q_start = tl.full([], 0, tl.int64)
        q_len = seq_q
        k_start = tl.full([], 0, tl.int64)
        k_len = seq_k
    return q_start, q_len, k_start, k_len


@triton.jit
def load_rows(base, rows, row_ok, stride_s, offs_d, HEAD_DIM: tl.constexpr):
    """Tile T[r, d] = base[rows[r] * stride_s + offs_d[d]], shape [len(rows), len(offs_d)];
    0 where row_ok[r] is False or offs_d[d] >= HEAD_DIM (the padding up to BLOCK_D).
    base points at the (sequence, head) the rows index; rows int64 for long packed batches."""
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * stride_s + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(base, rows, row_ok, stride_s, offs_d, value, HEAD_DIM: tl.constexpr):
    """The converse of load_rows: base[rows[r] * stride_s + offs_d[d]] = value[r, d] cast to
    base's element type, on the rows and head-dim columns that exist."""
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(
        base + rows[:, None] * stride_s + offs_d[None, :],
        value.to(base.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def kv_block_range(
    m0, q_len, k_len, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """For queries [m0, m0 + BLOCK_M): keys [0, full) sit in whole key blocks every query
    of the block sees (no mask needed); keys [full, end) need the causal/bounds mask.

    Causal, bottom-right aligned: query i sees key j iff j <= i + (k_len - q_len).
    """
    if IS_CAUSAL:
        shift = k_len - q_len
        end = tl.maximum(tl.minimum(k_len, m0 + BLOCK_M + shift), 0)
        full = tl.maximum(tl.minimum(m0 + shift + 1, k_len), 0)
    else:
        end = k_len
        full = k_len
    full = (full // BLOCK_N) * BLOCK_N
    return full, end


@triton.jit
def q_block_range(
    n0, q_len, k_len, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """For keys [n0, n0 + BLOCK_N): query blocks from ``lo`` may see some key of the block;
    from ``mid`` on (a multiple of BLOCK_M above lo) every query sees every key (no causal
    mask needed). Non-causal: lo = mid = 0."""
    if IS_CAUSAL:
        shift = k_len - q_len
        lo = tl.maximum(n0 - shift, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.maximum(n0 + BLOCK_N - 1 - shift, lo)
        mid = tl.minimum(
            ((mid + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, ((q_len + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        )
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    return lo, mid


@triton.jit
def split_pid(n_blocks):
    """(block, row) of this program in a flat grid of n_blocks * rows programs on axis 0,
    blocks fastest: the programs of one (batch, head) row run together and share its K/V
    in L2. Axis 0 holds up to 2^31 - 1 programs; axes 1 and 2 stop at 65535, which
    batch * heads passes (BERT at batch 5462 with 12 heads)."""
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


def flat_grid(length: int, rows: int, block: str):
    """Launch grid for ``split_pid``: cdiv(length, meta[block]) * rows programs on axis 0."""
    return lambda meta: (triton.cdiv(length, meta[block]) * rows,)


@triton.jit
def _dropout_mask_kernel(
    OUT, seed, seq_q, seq_k, p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """OUT (B*H, Sq, Sk) int8 keep-mask, one [BLOCK_M, BLOCK_N] tile per program. Grid
    (B*H, query blocks, key blocks): batch * heads on axis 0, the only one past 65535."""
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = bh * seq_q + offs_m.to(tl.int64)
    keep = dropout_keep(seed, rows[:, None], offs_n.to(tl.int64)[None, :], seq_k, p)
    ptrs = OUT + rows[:, None] * seq_k + offs_n[None, :]
    ok = (offs_m < seq_q)[:, None] & (offs_n < seq_k)[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=ok)


def dropout_keep_mask(
    seed: int, batch: int, heads: int, seq_q: int, seq_k: int, p: float, device: torch.device
) -> torch.Tensor:
    """The kernels' keep-mask as a bool tensor (B, H, Sq, Sk) (a debugging and test aid)."""
    out = torch.empty((batch, heads, seq_q, seq_k), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.bool()
    block = 32
    grid = (batch * heads, triton.cdiv(seq_q, block), triton.cdiv(seq_k, block))
    _dropout_mask_kernel[grid](out, seed, seq_q, seq_k, float(p), BLOCK_M=block, BLOCK_N=block)
    return out.bool()


@triton.jit
def _cu_seqlens_bad(CU, batch, total, max_len, BLOCK: tl.constexpr):
    """True unless CU (batch + 1,) starts at 0, ends at total and every step is in
    [0, max_len]."""
    bad = (tl.load(CU) != 0) | (tl.load(CU + batch) != total)
    for s in range(0, batch, BLOCK):
        i = s + tl.arange(0, BLOCK)
        ok = i < batch
        lens = tl.load(CU + i + 1, mask=ok, other=0) - tl.load(CU + i, mask=ok, other=0)
        bad = bad | (tl.max((ok & ((lens < 0) | (lens > max_len))).to(tl.int32), 0) != 0)
    return bad


@triton.jit
def _nan_if_invalid_kernel(
    X, n, CU_Q, CU_K, batch, total_q, total_k, max_q, max_k,
    BLOCK: tl.constexpr, CU_BLOCK: tl.constexpr,
):  # fmt: skip
    """X (n,) = NaN if cu_seqlens are invalid, untouched otherwise. Each program re-reads
    the offsets (B + 1 ints, cached) instead of a separate flag kernel and buffer."""
    bad = _cu_seqlens_bad(CU_Q, batch, total_q, max_q, CU_BLOCK)
    bad = bad | _cu_seqlens_bad(CU_K, batch, total_k, max_k, CU_BLOCK)
    if bad:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        nan = tl.full([BLOCK], float("nan"), tl.float32)
        tl.store(X + offs, nan.to(X.dtype.element_ty), mask=offs < n)


def nan_if_invalid_cu_seqlens(
    outputs, cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int,
    max_q: int, max_k: int,
) -> None:  # fmt: skip
    """The defined result of invalid cu_seqlens/max_seqlen (unchecked on CUDA: reading them
    would be a host sync): every element of each contiguous tensor in ``outputs`` becomes
    NaN, on the device. A no-op, without host sync, for valid values."""
    batch, block = cu_q.numel() - 1, 1024
    for x in outputs:
        if x.numel():
            _nan_if_invalid_kernel[(triton.cdiv(x.numel(), block),)](
                x, x.numel(), cu_q, cu_k, batch, total_q, total_k, max_q, max_k,
                BLOCK=block, CU_BLOCK=128,
            )  # fmt: skip


# ------------------------------------------------------------------ launcher helpers


def layout_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides: packed tensors (total, H, D) have no batch stride (the
    sequence start comes from cu_seqlens); padded ones are (B, S, H, D)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of the fp32 row statistics: (H, total_q) packed, (B, H, Sq) padded."""
    if varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


def head_block(head_dim: int) -> int:
    """The head dim padded to a power of two (at least 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def seq_bucket(n: int) -> int:
    """Autotune key: a power-of-two bucket, so each new length does not re-tune."""
    return triton.next_power_of_2(max(int(n), 1))


def smem_bytes(block_m: int, block_n: int, block_d: int, stages: int, elt: int) -> int:
    """Shared memory of one program as Triton's software pipelining lays it out: a resident
    [M, D] tile and ``stages`` buffered pairs of [N, D] tiles (K and V, or Q and dO).
    Checked against the compiler by tests/kernels/test_sm90_compile.py: exact for the
    forward (fp16 hd128 128x128x3: 224 KB), an upper bound for the backward passes."""
    return (block_m * block_d + stages * 2 * block_n * block_d) * elt


SMEM_LIMIT = 232448  # bytes one block may opt in to on H100 (227 KB)

# Estimated registers per thread (tile_regs) above which a config spills on sm_90, per
# kernel. Fitted to the sm_90 compile of every config at head dims 64, 80 and 128 (fp16,
# each flag variant), which tests/kernels/test_sm90_compile.py repeats: it fails if a kept
# config spills. Seen there: fwd hd64 128x128x8w (32 B) and hd128 128x128x8w (160 B);
# dk/dv at hd128 on every config but 16x64x8w (8-664 B, 255 registers); dq never.
REG_BUDGET = {"fwd": 160, "dkdv": 128, "dq": 255}


def tile_regs(kind: str, config, block_d: int, elt: int, dropout: bool, padded_d: bool) -> float:
    """Estimated registers per thread of an attention config: fp32 accumulators (o for fwd
    and dq; dk and dv for dkdv) and [BLOCK_M, BLOCK_N] score tiles (S, P and the exp/mask
    temporaries; the keep-mask with dropout), the resident rows (q for fwd; k and v for
    dkdv; q and dO for dq) and a quarter of the rows streamed per step (k, v; or q, dO for
    dkdv). A head dim below BLOCK_D (80 -> 128) costs its column masks."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    acc_rows, resident_rows, streamed_rows = {
        "fwd": (bm, bm, 2 * bn),
        "dkdv": (2 * bn, 2 * bn, 2 * bm),
        "dq": (bm, 2 * bm, 2 * bn),
    }[kind]
    acc = acc_rows * block_d * (1.125 if padded_d else 1.0)
    tiles = bm * bn * (2.25 if dropout else 1.75)
    operands = (resident_rows + streamed_rows / 4) * block_d
    return regs_per_thread(acc + tiles, operands, config.num_warps, elt)


def pruner(kind: str):
    """early_config_prune for the ``kind`` kernel ("fwd", "dkdv", "dq"): drop configs whose
    tiles overflow an H100 block's shared memory or exceed the register budget at this head
    dim, dtype and flags. Always keeps one (the smallest estimate). fp32 computes its dots
    on FMA units (true fp32, no tensor cores) and spills at every tile shape on sm_90: it
    keeps only the smallest. Order is kept: the first survivor is FASTLM_AUTOTUNE=0's pick.
    On GPUs with less shared memory (A100: 163 KB) the autotuner skips the rest as
    OutOfResources, an infinitely slow config."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d = args["BLOCK_D"]
        fp32 = args["Q"].dtype == torch.float32
        elt = 4 if fp32 else 2
        padded = args.get("HEAD_DIM", block_d) != block_d

        def regs(c):
            return tile_regs(kind, c, block_d, elt, bool(args.get("HAS_DROPOUT")), padded)

        def fits(c):
            kw = c.kwargs
            smem = smem_bytes(kw["BLOCK_M"], kw["BLOCK_N"], block_d, c.num_stages, elt)
            return smem <= SMEM_LIMIT and regs(c) <= REG_BUDGET[kind]

        smallest = min(configs, key=regs)
        if fp32:
            return [smallest]
        return [c for c in configs if fits(c)] or [smallest]

    return prune


def configs(gpu: list[tuple[int, int, int, int]], interp_block_m: int, interp_block_n: int):
    """Autotune configs (BLOCK_M, BLOCK_N, num_warps, num_stages); a single config under
    the interpreter (which cannot autotune) with small blocks (it pays per element)."""
    if interpreting():
        return [
            triton.Config(
                {"BLOCK_M": interp_block_m, "BLOCK_N": interp_block_n}, num_warps=4, num_stages=1
            )
        ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu
    ]
