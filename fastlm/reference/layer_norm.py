"""LayerNorm with optional fused residual add, in plain PyTorch.

z = x + residual            (or z = x)
mean = mean(z, -1),  rstd = 1 / sqrt(var(z, -1, biased) + eps)
y = (z - mean) * rstd * weight + bias
"""

from __future__ import annotations

import torch

from fastlm.reference._util import compute_dtype, up


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Returns y, or (y, x + residual) when ``residual`` is given."""
    ct = compute_dtype(x.dtype)
    z = x.to(ct) if residual is None else x.to(ct) + residual.to(ct)
    mean = z.mean(-1, keepdim=True)
    var = (z - mean).square().mean(-1, keepdim=True)
    y = (z - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * up(weight, ct)
    if bias is not None:
        y = y + up(bias, ct)
    y = y.to(x.dtype)
    if residual is None:
        return y
    return y, z.to(x.dtype)


def layer_norm_stats(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row mean and rstd in fp32 (fp64 for fp64 input), shape (..., )."""
    ct = compute_dtype(z.dtype)
    zc = z.to(ct)
    mean = zc.mean(-1)
    rstd = torch.rsqrt((zc - mean[..., None]).square().mean(-1) + eps)
    return mean, rstd


def layer_norm_backward(
    dy: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dz_extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of y = LN(z) given dy; ``dz_extra`` is the gradient reaching z = x + residual
    directly (the second output of the fused residual form).

        xhat = (z - mean) * rstd,   g = dy * weight
        dz = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dz_extra
        dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
    Returns (dz, dweight, dbias) with dz in z's dtype, dweight/dbias in weight's dtype.
    """
    ct = compute_dtype(z.dtype)
    n = z.shape[-1]
    xhat = (z.to(ct) - mean.to(ct)[..., None]) * rstd.to(ct)[..., None]
    dyc = dy.to(ct)
    g = dyc * up(weight, ct) if weight is not None else dyc
    c1 = (g * xhat).sum(-1, keepdim=True) / n
    c2 = g.sum(-1, keepdim=True) / n
    dz = (g - c2 - xhat * c1) * rstd.to(ct)[..., None]
    if dz_extra is not None:
        dz = dz + dz_extra.to(ct)
    rows = tuple(range(dy.dim() - 1))
    dweight = None if weight is None else (dyc * xhat).sum(rows).to(weight.dtype)
    dbias = None if bias is None else dyc.sum(rows).to(bias.dtype)
    return dz.to(z.dtype), dweight, dbias
