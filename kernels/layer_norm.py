"""LayerNorm with fused residual add: forward and backward.

Forward, per row of N features (fp32 statistics):

    z    = x + residual                      (rounded to the input dtype, as PyTorch would)
    mean = sum(z) / N
    rstd = 1 / sqrt(sum((z - mean)^2) / N + eps)
    y    = (z - mean) * rstd * weight + bias

Backward, with xhat = (z - mean) * rstd and g = dy * weight:

    dz      = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dz_extra
    dweight = sum over rows of dy * xhat
    dbias   = sum over rows of dy

Shapes: x, residual, y, z, dy, dz: (M, N) with row strides and a contiguous last dim;
weight, bias: (N,); mean, rstd: (M,) fp32.

Each program works on a [BLOCK_M, BLOCK_N] tile holding BLOCK_M whole rows (BLOCK_N is N
rounded up to a power of two), so small hidden sizes still give each program enough work.
The backward runs a fixed grid of programs, each owning a contiguous band of rows and
accumulating its dweight/dbias partial in registers; the (programs, N) partials are then
summed once. No atomics, and the partials are a few hundred rows, not M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels._launch import next_pow2, num_programs_hint
from fastlm.kernels.limits import LAYER_NORM_MAX_N

MAX_N = LAYER_NORM_MAX_N


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, Z, MEAN, RSTD,
    M, N, stride_x, stride_r, stride_y, stride_z, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    z = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the activation dtype: the returned z and the statistics agree.
        z = (z.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        if STORE_Z:
            tl.store(Z + rows64 * stride_z + cols[None, :], z, mask=mask)
    z = z.to(tl.float32)

    mean = tl.sum(z, axis=1) / N
    zc = tl.where(mask, z - mean[:, None], 0.0)
    var = tl.sum(zc * zc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = zc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, DZE, Z, W, MEAN, RSTD, DZ, DW_PART, DB_PART,
    M, N, stride_dy, stride_dze, stride_z, stride_dz, rows_per_program,
    HAS_DZ_EXTRA: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]

        z = tl.load(Z + rows64 * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_WEIGHT else dy
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dz = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DZ_EXTRA:
            dze = tl.load(DZE + rows64 * stride_dze + cols[None, :], mask=mask, other=0.0)
            dz += dze.to(tl.float32)
        tl.store(DZ + rows64 * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)

        if NEED_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if NEED_DB:
            db_acc += tl.sum(dy, axis=0)

    if NEED_DW:
        tl.store(DW_PART + pid * N + cols, dw_acc, mask=col_ok)
    if NEED_DB:
        tl.store(DB_PART + pid * N + cols, db_acc, mask=col_ok)


def _tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~4K elements per program, whole rows."""
    block_n = next_pow2(n)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = min(16, max(1, block_m * block_n // 512))
    return block_m, block_n, num_warps


def layer_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    store_z: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """x, residual: (M, N). Returns y (M, N), z = x + residual (M, N) when residual is given
    and ``store_z`` (else None), mean and rstd (M,) fp32."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    z = (
        torch.empty((m, n), dtype=x.dtype, device=x.device)
        if residual is not None and store_z
        else None
    )
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, z, mean, rstd
    block_m, block_n, num_warps = _tile(n)
    dummy = y
    _layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, residual if residual is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        y, z if z is not None else dummy, mean, rstd,
        m, n, x.stride(0), residual.stride(0) if residual is not None else 0,
        y.stride(0), z.stride(0) if z is not None else 0, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, STORE_Z=z is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return y, z, mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor,
    dz_extra: torch.Tensor | None,
    z: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_dweight: bool,
    need_dbias: bool,
    dz_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dy, dz_extra, z: (M, N). Returns dz (M, N), dweight and dbias (N,) fp32 (or None)."""
    m, n = z.shape
    dz = torch.empty((m, n), dtype=dz_dtype, device=z.device)
    if m == 0:
        zeros = torch.zeros((n,), dtype=torch.float32, device=z.device)
        return dz, zeros if need_dweight else None, zeros.clone() if need_dbias else None
    block_m, block_n, num_warps = _tile(n)
    # ~2 programs per SM: enough rows in flight, and the (programs, N) fp32 partials stay a
    # few percent of the traffic of dy, z and dx.
    programs = max(1, min(triton.cdiv(m, block_m), 2 * num_programs_hint(z.device)))
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    dw_part = (
        torch.empty((programs, n), dtype=torch.float32, device=z.device) if need_dweight else None
    )
    db_part = (
        torch.empty((programs, n), dtype=torch.float32, device=z.device) if need_dbias else None
    )
    _layer_norm_bwd_kernel[(programs,)](
        dy, dz_extra if dz_extra is not None else dy, z,
        weight if weight is not None else dy, mean, rstd, dz,
        dw_part if dw_part is not None else mean, db_part if db_part is not None else mean,
        m, n, dy.stride(0), dz_extra.stride(0) if dz_extra is not None else 0,
        z.stride(0), dz.stride(0), rows_per_program,
        HAS_DZ_EXTRA=dz_extra is not None, HAS_WEIGHT=weight is not None,
        NEED_DW=need_dweight, NEED_DB=need_dbias,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    dweight = dw_part.sum(0) if dw_part is not None else None
    dbias = db_part.sum(0) if db_part is not None else None
    return dz, dweight, dbias
