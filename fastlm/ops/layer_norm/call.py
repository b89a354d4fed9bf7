"""The record of one fastlm.layer_norm call, and every check of its arguments.

Validation happens once, here, before any backend is chosen: type, dtype, device, shapes,
strides and eps. Backends then only state their own limits (``reason(call)`` in
``_<backend>.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlm.ops import _checks as C

OP = "layer_norm"


# Not frozen: a frozen dataclass pays object.__setattr__ per field (0.65 against 0.19 us
# per record, measured); records are built once per call and never modified.
@dataclass(slots=True)
class LayerNormCall:
    """x (..., N); weight, bias (N,) or None; residual like x or None."""

    x: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    eps: float
    n: int  # the normalized size, x.shape[-1] (read once, by the checks)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def dispatch_key(self) -> tuple:
        return (self.x.device, self.x.dtype, self.n, self.residual is not None)

    @classmethod
    def checked(cls, x, weight, bias, eps, residual) -> LayerNormCall:
        """Validate the public arguments (ValueError/TypeError naming what was expected and
        what was given) and build the record. The usual, valid call is recognised in a few
        attribute reads (_plainly_valid); anything else gets every check (_validate)."""
        n = _plainly_valid(x, weight, bias, eps, residual)
        if not n:
            _validate(x, weight, bias, eps, residual)
            n = x.shape[-1]
        return cls(x, weight, bias, residual, float(eps), n)


_FLOAT = frozenset(C.FLOAT_DTYPES)
_PLAIN = C.PLAIN_TENSORS


def _plainly_valid(x, weight, bias, eps, residual) -> int:
    """A cheap sufficient condition for _validate to pass: plain contiguous tensors of the
    supported dtypes on x's device, the expected shapes, a float eps >= 0. The hot path of
    every model. Returns the normalized size N when it holds; 0 only means "check
    everything", never "invalid".

    Contiguity stands in for "unit last-dim stride": ``is_contiguous()`` is a flag read,
    where ``stride(-1)`` costs five times as much (this check runs once per LayerNorm call).
    Likewise on CPU, where there is one device, ``is_cpu`` (a flag) stands in for comparing
    ``device`` objects.
    """
    if type(x) not in _PLAIN or x.dtype not in _FLOAT or not x.is_contiguous():
        return 0
    shape = x.shape
    if not shape or not shape[-1]:
        return 0
    n, on_cpu = shape[-1], x.is_cpu
    device = None if on_cpu else x.device
    for t in (weight, bias):
        if t is not None and (
            type(t) not in _PLAIN or t.dtype not in _FLOAT or t.dim() != 1
            or t.numel() != n or not t.is_contiguous()
            or (not t.is_cpu if on_cpu else t.device != device)
        ):  # fmt: skip
            return 0
    if residual is not None and (
        type(residual) not in _PLAIN or residual.dtype != x.dtype
        or residual.shape != shape or not residual.is_contiguous()
        or (not residual.is_cpu if on_cpu else residual.device != device)
    ):  # fmt: skip
        return 0
    return n if type(eps) is float and eps >= 0 else 0


def _validate(x, weight, bias, eps, residual) -> None:
    C.check_tensor(OP, "x", x)
    C.check_float(OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"fastlm.{OP}: x must have at least 1 dimension, got a 0-d tensor")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(
            f"fastlm.{OP}: the normalized (last) dimension of x is empty, shape {tuple(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            C.check_tensor(OP, name, t)
            C.check_float(OP, name, t)
            C.check_shape(OP, name, t, (n,))
    if residual is not None:
        C.check_tensor(OP, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"fastlm.{OP}: residual must have the shape of x {tuple(x.shape)}, got "
                f"{tuple(residual.shape)}"
            )
    C.check_same_device(OP, "x", x, weight=weight, bias=bias, residual=residual)
    C.check_same_dtype(OP, "x", x, residual=residual)
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None:
            C.check_last_dim_contiguous(OP, name, t)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"fastlm.{OP}: eps must be a non-negative float, got {eps!r}")
