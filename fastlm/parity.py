"""The numerical parity rule (see ARCHITECTURE.md), shared by the tests and ``python -m fastlm check``.

* fp32 results: torch.testing.assert_close defaults (rtol 1.3e-6, atol 1e-5) against a
  high-precision oracle.
* fp16/bf16 results: the max error against the oracle is at most twice the error of the
  same op run by PyTorch in that low precision (the baseline), plus a floor of one rounding
  step of the output's dtype at the oracle's magnitude (the FlashAttention rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rounding_step(dtype: torch.dtype, magnitude: float) -> float:
    return torch.finfo(dtype).eps * max(magnitude, 1e-3)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@dataclass
class Verdict:
    ok: bool
    err: float
    bound: float
    detail: str


def judge(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    atol: float | None = None,
) -> Verdict:
    """Apply the rule; ``oracle`` is the fp64/fp32 reference, ``baseline`` PyTorch in actual's dtype."""
    if actual.shape != oracle.shape:
        return Verdict(
            False, float("inf"), 0.0, f"shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
        )
    if actual.is_floating_point() and torch.isnan(actual).any():
        return Verdict(False, float("nan"), 0.0, "NaN in result")
    err = max_err(actual, oracle)
    if actual.dtype == torch.float32:
        rtol, a = 1.3e-6, 1e-5 if atol is None else atol
        excess = (
            (actual.double() - oracle.double()).abs() - (a + rtol * oracle.double().abs())
        ).max()
        ok = actual.numel() == 0 or excess.item() <= 0
        bound = a + rtol * (oracle.double().abs().max().item() if oracle.numel() else 0.0)
        return Verdict(ok, err, bound, f"max error {err:.3e} (fp32: atol {a:g}, rtol {rtol:g})")
    mag = oracle.double().abs().max().item() if oracle.numel() else 0.0
    base = max_err(baseline, oracle) if baseline is not None else 0.0
    bound = 2 * base + rounding_step(actual.dtype, mag) + (atol or 0.0)
    detail = (
        f"max error {err:.3e} vs bound {bound:.3e} (2 x PyTorch {str(actual.dtype)[6:]} error "
        f"{base:.3e} + one rounding step at magnitude {mag:.3e})"
    )
    return Verdict(err <= bound, err, bound, detail)


def assert_parity(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    name: str = "output",
    atol: float | None = None,
) -> None:
    v = judge(actual, oracle, baseline, atol=atol)
    if not v.ok:
        raise AssertionError(f"{name}: {v.detail}")
