"""Input validation shared by the public ops.

Every public op validates before launching anything; each message names the op, what was
expected and what was given. Silent wrong results are the one unforgivable bug.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The types the ops' fast checks (``_plainly_valid``) take as plain tensors: a Parameter (a
# module's weight) is a Tensor that dispatches as one; any other subclass (DTensor, fake
# or wrapper tensors) gets every check.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastlm.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(_name(d) for d in FLOAT_DTYPES)
        raise TypeError(f"fastlm.{op}: {name} must be one of {allowed}, got {_name(t.dtype)}")


def check_same_dtype(
    op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None
) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"fastlm.{op}: {name} has dtype {_name(t.dtype)} but {ref_name} has "
                f"{_name(ref.dtype)}; operands must share one dtype"
            )


def check_same_device(
    op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None
) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"fastlm.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "all operands must be on one device"
            )


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"fastlm.{op}: {name} must have a contiguous last dimension (stride 1), "
            f"got strides {tuple(t.stride())} for shape {tuple(t.shape)}"
        )


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """``expected`` entries of None match any size."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        parts = ["*" if e is None else str(e) for e in expected]
        want = "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
        raise ValueError(f"fastlm.{op}: {name} must have shape {want}, got {tuple(t.shape)}")


def check_dim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(
            f"fastlm.{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}"
        )


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` (..., N) as (M, N) without copying when its strides allow it.

    Leading dims that do not collapse into one row stride force a copy (reshape); the
    last dim is contiguous by validation.
    """
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def unit_stride_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """Incoming gradients can be expanded (stride 0) or strided views; kernels need a
    contiguous last dim. Copies only when that is not already so."""
    if t is None or t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


# ------------------------------------------------------------------ attention-family checks
# Shared by fastlm.attention, fastlm.attention_varlen and fastlm.attention_with_kvcache, so
# the three accept and reject exactly the same scalars.


def default_softmax_scale(head_dim: int) -> float:
    """The softmax scale when the caller gives none: 1 / sqrt(head_dim) (the one definition)."""
    return head_dim**-0.5


def check_flag(op: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"fastlm.{op}: {name} must be a bool, got {type(value).__name__}")


def check_softmax_scale(op: str, softmax_scale: object) -> None:
    """None (the default scale) or a positive finite number."""
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(
            f"fastlm.{op}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}"
        )
    if not 0 < softmax_scale < float("inf"):
        raise ValueError(
            f"fastlm.{op}: softmax_scale must be positive and finite, got {softmax_scale!r}"
        )


def check_gqa(op: str, heads: int, kv_heads: int) -> None:
    """Query heads must be a multiple of the kv heads (MHA, GQA, MQA)."""
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"fastlm.{op}: the number of query heads ({heads}) must be a multiple of the number "
            f"of key/value heads ({kv_heads})"
        )


def check_head_dim(op: str, head_dim: int) -> None:
    """Any backend: a non-empty head dim (kernel limits are the backends' reasons)."""
    if head_dim < 1:
        raise ValueError(f"fastlm.{op}: head_dim must be at least 1, got {head_dim}")


def check_no_self_overlap(op: str, name: str, t: torch.Tensor, why: str) -> None:
    """``t`` is written in place, so no two of its elements may share memory: no stride 0
    on a dim of size > 1 (an expanded tensor) and no strides that make rows overlap.

    Overlap is judged by the usual sufficient test: with the dims of size > 1 sorted by
    stride, each stride must reach past everything the smaller ones span. It also refuses
    interleaved layouts that happen not to overlap (as exotic as they sound), never a
    permuted or sliced dense tensor."""
    shape, strides = tuple(t.shape), tuple(t.stride())
    for dim, (size, stride) in enumerate(zip(shape, strides)):
        if size > 1 and stride == 0:
            raise ValueError(
                f"fastlm.{op}: {name} is expanded (stride 0 in dim {dim}, shape {shape}, "
                f"strides {strides}), so its elements share memory; {why}"
            )
    span = 1  # elements covered by the dims already seen (smaller strides)
    for stride, size in sorted((st, sz) for st, sz in zip(strides, shape) if sz > 1):
        if stride < span:
            raise ValueError(
                f"fastlm.{op}: {name} has overlapping rows (shape {shape}, strides "
                f"{strides}); {why}"
            )
        span += stride * (size - 1)
