"""The record of one fastlm.linear_gelu or fastlm.gelu_ffn call, and every check of its
arguments.

linear_gelu is gelu_ffn's first layer alone, so one record serves both: ``w2`` is None for
linear_gelu. Validation happens once, here, before any backend is chosen: types, dtypes,
devices, shapes, strides and ``approximate``. Backends then only state their own limits
(``reason(call)`` in ``_<backend>.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlm.ops import _checks as C

OP_LINEAR_GELU = "linear_gelu"
OP_GELU_FFN = "gelu_ffn"
# The torch.nn.functional.gelu ``approximate`` values: exact erf GELU (BERT), tanh (GPT-2).
APPROXIMATIONS = ("none", "tanh")
# What each op calls its first layer's weight and bias in its signature (and messages).
_FIRST_LAYER_NAMES = {OP_LINEAR_GELU: ("weight", "bias"), OP_GELU_FFN: ("w1", "b1")}


# Not frozen: a frozen dataclass pays object.__setattr__ per field (0.65 against 0.19 us
# per record, measured); records are built once per call and never modified.
@dataclass(slots=True)
class FFNCall:
    """x (..., K); w1 (N, K), b1 (N,) or None; for gelu_ffn also w2 (H, N), b2 (H,) or None
    and residual (..., H) or None. Weights as torch.nn.Linear (out_features, in_features),
    any strides.

        linear_gelu:  y   = gelu(x w1^T + b1)
        gelu_ffn:     out = gelu(x w1^T + b1) w2^T + b2 (+ residual)
    """

    x: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor | None
    b2: torch.Tensor | None
    residual: torch.Tensor | None
    approximate: str

    @property
    def op(self) -> str:
        return OP_LINEAR_GELU if self.w2 is None else OP_GELU_FFN

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def out_shape(self) -> tuple[int, ...]:
        last = self.w1 if self.w2 is None else self.w2
        return (*self.x.shape[:-1], last.shape[0])

    def dispatch_key(self) -> tuple:
        # No alignment flags: the CUDA epilogue kernels choose their vector path at run time.
        return (self.x.device, self.x.dtype, self.approximate)

    @classmethod
    def checked(
        cls,
        op: str,
        x,
        w1,
        b1,
        w2=None,
        b2=None,
        residual=None,
        *,
        approximate,
    ) -> FFNCall:
        """Validate the public arguments of ``op`` (linear_gelu: x, weight, bias; gelu_ffn:
        all) and build the record. Raises TypeError/ValueError naming the op, what was
        expected and what was given. The usual, valid call is recognised in a few attribute
        reads (_plainly_valid); anything else gets every check."""
        if op == OP_LINEAR_GELU:
            w2 = b2 = residual = None  # no second layer: the record says linear_gelu
        # (gelu_ffn without its second layer takes the full checks, which say so)
        plain = op == OP_LINEAR_GELU or w2 is not None
        if not (plain and _plainly_valid(x, w1, b1, w2, b2, residual, approximate)):
            _validate(op, x, w1, b1, w2, b2, residual, approximate)
        return cls(x, w1, b1, w2, b2, residual, approximate)


def _validate(op: str, x, w1, b1, w2, b2, residual, approximate) -> None:
    """Every check of ``op``'s arguments (w2, b2, residual None for linear_gelu)."""
    w_name, b_name = _FIRST_LAYER_NAMES[op]
    C.check_tensor(op, "x", x)
    C.check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(
            f"fastlm.{op}: x must have at least 1 dimension (..., in_features), got a 0-d tensor"
        )
    C.check_last_dim_contiguous(op, "x", x)
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(
            f"fastlm.{op}: approximate must be one of {APPROXIMATIONS}, got {approximate!r}"
        )
    inter = _check_linear(op, "x", x.shape[-1], w_name, w1, b_name, b1)
    operands = {w_name: w1, b_name: b1}
    if op != OP_LINEAR_GELU:
        out_features = _check_linear(op, "the intermediate activation", inter, "w2", w2, "b2", b2)
        if residual is not None:
            out_shape = (*x.shape[:-1], out_features)
            C.check_tensor(op, "residual", residual)
            if tuple(residual.shape) != out_shape:
                raise ValueError(
                    f"fastlm.{op}: residual must have the output's shape {out_shape}, "
                    f"got {tuple(residual.shape)}"
                )
            C.check_last_dim_contiguous(op, "residual", residual)
        operands.update(w2=w2, b2=b2, residual=residual)
    for name, t in operands.items():
        if t is not None:
            C.check_float(op, name, t)
    C.check_same_dtype(op, "x", x, **operands)
    C.check_same_device(op, "x", x, **operands)


_FLOAT = frozenset(C.FLOAT_DTYPES)
_PLAIN = C.PLAIN_TENSORS


def _plainly_valid(x, w1, b1, w2, b2, residual, approximate) -> bool:
    """A cheap sufficient condition for the full checks of gelu_ffn to pass (linear_gelu's
    when ``w2`` is None): plain tensors (a module's Parameters included) of x's float dtype
    on x's device, x and the biases and residual contiguous, the shapes of a K -> N (-> H)
    FFN, a known ``approximate``. The hot path of every model layer; False only means
    "check everything", never "invalid"."""
    if (
        type(x) not in _PLAIN or x.dtype not in _FLOAT or not x.is_contiguous() or not x.dim()
        or type(approximate) is not str or approximate not in APPROXIMATIONS
    ):  # fmt: skip
        return False
    width = _plain_layer(x, x.shape[-1], w1, b1)
    if not width:
        return False
    if w2 is None:  # linear_gelu (its record has no b2 or residual)
        return True
    width = _plain_layer(x, width, w2, b2)
    if not width:
        return False
    return residual is None or (
        type(residual) in _PLAIN and residual.dtype == x.dtype and residual.is_contiguous()
        and residual.shape == (*x.shape[:-1], width) and _beside(x, residual)
    )  # fmt: skip


def _plain_layer(x, in_features: int, w, b) -> int:
    """out_features of a plainly valid (w, b) taking ``in_features`` in x's dtype and
    device; 0 when anything is less than plain."""
    if (
        type(w) not in _PLAIN or w.dtype != x.dtype or w.dim() != 2
        or w.shape[1] != in_features or not _beside(x, w)
    ):  # fmt: skip
        return 0
    out_features = w.shape[0]
    if b is not None and (
        type(b) not in _PLAIN or b.dtype != x.dtype or b.dim() != 1
        or b.shape[0] != out_features or not b.is_contiguous() or not _beside(x, b)
    ):  # fmt: skip
        return 0
    return out_features


def _beside(x: torch.Tensor, t: torch.Tensor) -> bool:
    """t on x's device (on CPU a flag read, not a device comparison)."""
    return t.is_cpu if x.is_cpu else t.device == x.device


def _check_linear(op: str, x_name: str, in_features: int, w_name: str, weight, b_name: str, bias):
    """Checks a (weight, bias) pair applied to ``in_features`` inputs; returns out_features."""
    C.check_tensor(op, w_name, weight)
    if weight.dim() != 2:
        raise ValueError(
            f"fastlm.{op}: {w_name} must be 2-D (out_features, in_features) like "
            f"torch.nn.Linear.weight, got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != in_features:
        raise ValueError(
            f"fastlm.{op}: {w_name} has in_features {weight.shape[1]} (shape "
            f"{tuple(weight.shape)}) but {x_name} has {in_features} features; expected "
            f"{w_name} of shape (*, {in_features})"
        )
    out_features = weight.shape[0]
    if bias is not None:
        C.check_tensor(op, b_name, bias)
        if bias.dim() != 1 or bias.shape[0] != out_features:
            raise ValueError(
                f"fastlm.{op}: {b_name} must have shape ({out_features},) to match {w_name} "
                f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
        C.check_last_dim_contiguous(op, b_name, bias)
    return out_features
