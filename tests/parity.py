"""The numerical parity rule of DESIGN.md, in one place.

* fp32 results: torch.testing.assert_close defaults against an fp64 oracle.
* fp16/bf16 results: the max error against the high-precision oracle is at most twice the
  error of the same op run by PyTorch in that low precision (the baseline), plus a floor of
  one rounding step of the output's dtype at the oracle's magnitude (the FlashAttention rule).
"""

from __future__ import annotations

import pytest
import torch

ON_GPU = torch.cuda.is_available()
# The Triton interpreter computes bf16 wrongly (DESIGN.md): bf16 kernels are tested on a GPU.
KERNEL_DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not ON_GPU, reason="bf16 is wrong under the Triton interpreter; runs on GPU"
        ),
    ),
]


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64


def rounding_step(dtype: torch.dtype, magnitude: float) -> float:
    return torch.finfo(dtype).eps * max(magnitude, 1e-3)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_parity(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    name: str = "output",
    atol: float | None = None,
) -> None:
    """``oracle``: the fp64 (or fp32) reference; ``baseline``: PyTorch in actual's dtype."""
    assert actual.shape == oracle.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    )
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    if actual.dtype == torch.float32:
        # fp32 defaults (rtol 1.3e-6, atol 1e-5): compare in fp32 so those defaults apply.
        kw = {} if atol is None else {"atol": atol, "rtol": 1.3e-6}
        torch.testing.assert_close(
            actual, oracle.to(actual.dtype), msg=lambda m: f"{name}: {m}", **kw
        )
        return
    mag = oracle.double().abs().max().item() if oracle.numel() else 0.0
    err = max_err(actual, oracle)
    base = max_err(baseline, oracle) if baseline is not None else 0.0
    bound = 2 * base + rounding_step(actual.dtype, mag) + (atol or 0.0)
    assert err <= bound, (
        f"{name}: max error {err:.3e} > bound {bound:.3e} "
        f"(2 x baseline {base:.3e} + one {actual.dtype} rounding step at magnitude {mag:.3e})"
    )
