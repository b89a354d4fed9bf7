"""The bias+GELU feed-forward: one GEMM kernel with a fused epilogue, and the GELU backward.

Fused GEMM (``fused_matmul``), fp32 accumulation, one output tile per program:

    acc  = A @ B                                   A: (M, K), B: (K, N), any strides
    acc += bias                                    HAS_BIAS, bias: (N,)
    P    = acc                                     STORE_PRE: the pre-activation h, for the backward
    acc  = act(acc)                                ACT: identity | gelu (erf) | gelu (tanh)
      or acc = acc * act'(P)                       ACT_GRAD: P is loaded instead (backward epilogue)
    acc += residual                                HAS_RESIDUAL, residual: (M, N)
    C    = acc                                     rounded once, to C's dtype

Uses: the forward of linear_gelu (A = x, B = W^T as a strided view of W (N, K), bias, GELU,
store h); the second linear of gelu_ffn (bias + residual); and the gelu_ffn backward
dh1 = (dy @ W2) * gelu'(h1) (ACT_GRAD), which saves writing and re-reading dy @ W2.

GELU, with Phi / phi the standard normal cdf / pdf and s = sigmoid(2u),
u = sqrt(2/pi) * (h + 0.044715 h^3):

    erf:   gelu(h) = h * Phi(h),  gelu'(h) = Phi(h) + h * phi(h)
    tanh:  gelu(h) = 0.5 h (1 + tanh(u)) = h * s
           gelu'(h) = s + h * s (1 - s) * 2 u'(h),  u'(h) = sqrt(2/pi) (1 + 3 * 0.044715 h^2)

The sigmoid form is tanh's identity 0.5 (1 + tanh(u)) = sigmoid(2u); it avoids libdevice
tanh (missing in the interpreter) and computes 1 - tanh(u)^2 = 4 s (1 - s) without the
cancellation of 1 - t*t when |u| is large.

GELU backward (``gelu_bwd``): dh = dy * gelu'(h) elementwise, with the bias gradient
db = sum over rows of dh accumulated in fp32 in the same pass (per-program partials over a
band of rows, summed once afterwards: deterministic, no atomics).

Rows of A wrap around modulo M for the loads (the stores are masked) so only the K edge
needs a load mask; the GROUP_M swizzle walks GROUP_M row tiles per column band so that the
B tiles stay in L2.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastlm.kernels._autotune import autotune, launch, regs_per_thread
from fastlm.kernels._launch import fp32_dot_precision, next_pow2, num_programs_hint

# Epilogue activation codes (constexpr ACT).
IDENTITY, GELU_ERF, GELU_TANH = 0, 1, 2
ACTIVATIONS = {"identity": IDENTITY, "gelu": GELU_ERF, "gelu_tanh": GELU_TANH}

# Globals read inside @triton.jit must be constexpr: the GPU compiler rejects plain floats
# (the interpreter does not, which is why tests/kernels/test_sm90_compile.py exists).
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _gelu(h, ACT: tl.constexpr):
    """gelu(h) in fp32 (ACT: GELU_ERF or GELU_TANH)."""
    if ACT == 1:
        return h * 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
    else:
        u = _SQRT_2_OVER_PI * (h + _TANH_C * h * h * h)
        return h * tl.sigmoid(2.0 * u)


@triton.jit
def _gelu_grad(h, ACT: tl.constexpr):
    """gelu'(h) in fp32 (ACT: GELU_ERF or GELU_TANH)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
        pdf = _INV_SQRT_2PI * tl.exp(-0.5 * h * h)
        return cdf + h * pdf
    else:
        h2 = h * h
        u = _SQRT_2_OVER_PI * (h + _TANH_C * h2 * h)
        s = tl.sigmoid(2.0 * u)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * h2)
        return s + 2.0 * h * s * (1.0 - s) * du


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter can run one config only; small tiles keep the row-wrap, swizzle and
        # edge masks exercised by small test shapes.
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2},
                num_warps=4,
                num_stages=1,
            )
        ]

    # H100: wgmma tiles of 128 rows, 3-4 stages of 64-deep K slices in shared memory. The
    # 64-row tiles serve small M; the BLOCK_K=32 config is the one fp32 fits in shared memory
    # (configs that do not fit are skipped by the autotuner as out of resources). Configs
    # over the register budget are pruned (_prune_by_registers).
    def cfg(bm, bn, bk, stages, warps):
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )

    return [
        cfg(128, 256, 64, 3, 8),
        cfg(256, 128, 64, 3, 8),
        cfg(128, 128, 64, 4, 4),
        cfg(128, 128, 64, 3, 8),
        cfg(128, 64, 64, 4, 4),
        cfg(64, 128, 64, 4, 4),
        cfg(64, 256, 64, 4, 4),
        cfg(128, 128, 32, 3, 8),
    ]


# Estimated registers per thread above which a config spills on sm_90 (calibrated on the
# sm_90 compile, tests/kernels/test_sm90_compile.py: the four configs with a 128-element
# fp32 accumulator per thread spilled 8-968 B in fp16/bf16; fp32 128x64x4w spilled 16 B).
REG_BUDGET = 128


def _prune_by_registers(configs, named_args, **kwargs):
    """early_config_prune: drop the configs whose accumulator plus operand fragments
    (_autotune.regs_per_thread) exceed REG_BUDGET; keeps the smallest if none fits. Order
    is kept: the first survivor is FASTLM_AUTOTUNE=0's pick."""
    elt = 4 if named_args["A"].dtype == torch.float32 else 2

    def regs(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return regs_per_thread(bm * bn, (bm + bn) * bk, c.num_warps, elt)

    return [c for c in configs if regs(c) <= REG_BUDGET] or [min(configs, key=regs)]


@autotune(
    _configs(),
    key=["M_BUCKET", "N", "K", "ACT", "ACT_GRAD", "HAS_RESIDUAL"],
    prune=_prune_by_registers,
)
@triton.jit
def _fused_matmul_kernel(
    A, B, C, BIAS, RES, PRE,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_rm, stride_rn, stride_pm, stride_pn,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_GRAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # M_BUCKET (M rounded up to a power of two) is only an autotune key: one tuning per size
    # class of token counts, not one per distinct M.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Wrapped row/column indices for the loads: every loaded row is valid, so only K is masked.
    # No max_contiguous/multiple_of hints here: the wrapped edge tile is not contiguous.
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    a_ptrs = A + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + bn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    m_ok = rm < M
    n_ok = rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    rm64 = rm.to(tl.int64)[:, None]
    rn64 = rn.to(tl.int64)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(PRE + rm64 * stride_pm + rn64 * stride_pn, acc.to(PRE.dtype.element_ty), mask=mask)
    if ACT_GRAD:
        pre = tl.load(PRE + rm64 * stride_pm + rn64 * stride_pn, mask=mask, other=0.0).to(
            tl.float32
        )
        acc = acc * _gelu_grad(pre, ACT)
    elif ACT != 0:
        acc = _gelu(acc, ACT)
    if HAS_RESIDUAL:
        acc += tl.load(RES + rm64 * stride_rm + rn64 * stride_rn, mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(C + rm64 * stride_cm + rn64 * stride_cn, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    DY, H, DH, DB_PART,
    M, N, stride_dy, stride_h, stride_dh, rows_per_program,
    ACT: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid_m * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < last)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = dy * _gelu_grad(h, ACT)
        tl.store(DH + rows64 * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        if NEED_DB:
            db_acc += tl.sum(tl.where(mask, dh, 0.0), axis=0)
    if NEED_DB:
        tl.store(DB_PART + pid_m.to(tl.int64) * N + cols, db_acc, mask=col_ok)


# ------------------------------------------------------------------ launchers


def fused_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str = "identity",
    act_grad_of: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    store_pre: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """C = epilogue(a @ b) for a (M, K) and b (K, N) with any strides (pass ``w.t()`` for
    x @ W^T: a strided view, no copy). bias: (N,) contiguous; residual: (M, N), added last.

    ``act_grad_of`` (M, N): the backward epilogue C = (a @ b) * act'(act_grad_of) instead of
    applying the activation. ``store_pre``: also return the pre-activation (a @ b + bias) in
    C's dtype. Returns (C, pre or None), C contiguous (M, N).
    """
    m, k = a.shape
    n = b.shape[1]
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"fused_matmul: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
        )
    act = ACTIVATIONS[activation]
    if act_grad_of is not None and (act == IDENTITY or store_pre):
        raise ValueError("fused_matmul: act_grad_of needs a GELU activation and excludes store_pre")
    out_dtype = out_dtype or a.dtype
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    pre = torch.empty((m, n), dtype=out_dtype, device=a.device) if store_pre else None
    if m == 0 or n == 0:
        return c, pre
    aux = act_grad_of if act_grad_of is not None else pre
    dummy = c
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    launch(
        _fused_matmul_kernel, grid,
        a, b, c, bias if bias is not None else dummy, residual if residual is not None else dummy,
        aux if aux is not None else dummy,
        m, n, k, next_pow2(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        aux.stride(0) if aux is not None else 0, aux.stride(1) if aux is not None else 0,
        HAS_BIAS=bias is not None, ACT=act, ACT_GRAD=act_grad_of is not None,
        HAS_RESIDUAL=residual is not None, STORE_PRE=store_pre,
        DOT_PRECISION=fp32_dot_precision(a.dtype),
    )  # fmt: skip
    return c, pre


def gelu_bwd(
    dy: torch.Tensor, h: torch.Tensor, activation: str, need_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy, h: (M, N) with contiguous last dims. Returns dh = dy * gelu'(h) (M, N) in h's dtype
    and, when ``need_dbias``, db = sum over rows of dh (N,) in fp32."""
    act = ACTIVATIONS[activation]
    if act == IDENTITY:
        raise ValueError("gelu_bwd: activation must be 'gelu' or 'gelu_tanh', got 'identity'")
    m, n = h.shape
    dh = torch.empty((m, n), dtype=h.dtype, device=h.device)
    if m == 0 or n == 0:
        return dh, torch.zeros((n,), dtype=torch.float32, device=h.device) if need_dbias else None
    block_n = min(128, next_pow2(n))
    block_m = max(1, min(64, 4096 // block_n))
    col_blocks = triton.cdiv(n, block_n)
    # Enough row bands to fill the device twice over; each band sums its db partial in registers.
    bands = max(
        1, min(triton.cdiv(m, block_m), triton.cdiv(2 * num_programs_hint(h.device), col_blocks))
    )
    rows_per_program = triton.cdiv(triton.cdiv(m, bands), block_m) * block_m
    bands = triton.cdiv(m, rows_per_program)
    db_part = torch.empty((bands, n), dtype=torch.float32, device=h.device) if need_dbias else None
    _gelu_bwd_kernel[(bands, col_blocks)](
        dy, h, dh, db_part if db_part is not None else dh,
        m, n, dy.stride(0), h.stride(0), dh.stride(0), rows_per_program,
        ACT=act, NEED_DB=need_dbias, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return dh, db_part.sum(0) if db_part is not None else None
