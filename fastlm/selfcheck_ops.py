"""The op checks run by ``python -m fastlm check`` (see fastlm/selfcheck.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.selfcheck import Check


def _ln_make(dtype, device):
    m, n = 37, 1000
    return {
        "x": torch.randn(m, n, device=device).to(dtype),
        "weight": (1 + 0.2 * torch.randn(n, device=device)).to(dtype),
        "bias": (0.2 * torch.randn(n, device=device)).to(dtype),
        "residual": torch.randn(m, n, device=device).to(dtype),
    }


def _ln_run(backend, x, weight, bias, residual):
    from fastlm.ops.layer_norm import layer_norm

    return layer_norm(x, weight, bias, 1e-5, residual=residual, backend=backend)


def _ln_oracle(x, weight, bias, residual):
    from fastlm.reference.layer_norm import layer_norm

    return layer_norm(x, weight, bias, 1e-5, residual)


def _ln_lowp(x, weight, bias, residual):
    z = x + residual
    return F.layer_norm(z, z.shape[-1:], weight, bias, 1e-5), z


CHECKS: list[Check] = [
    Check(
        op="layer_norm",
        make=_ln_make,
        run=_ln_run,
        oracle=_ln_oracle,
        lowp=_ln_lowp,
        module="fastlm.ops.layer_norm",
        grad_args=("x", "weight", "bias", "residual"),
    ),
]
