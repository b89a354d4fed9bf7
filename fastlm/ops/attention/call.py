"""The record of one fastlm.attention / fastlm.attention_varlen call, and every check of
its arguments.

Validation happens once, here, before any backend is chosen: types, dtypes, devices,
shapes, strides, the scalar flags and, for packed calls, cu_seqlens. Backends then only
state their own limits (``reason(call)`` in ``_<backend>.py``). Validation is stateless
(nothing is remembered between calls) and never reads a CUDA tensor back to the host:

* cu_seqlens values on CPU tensors are checked eagerly (reading them is free) and a bad
  one raises ValueError;
* under torch.compile the same condition goes to ``torch._assert_async`` (no graph break,
  no host read; the run fails on the device);
* on CUDA tensors in eager mode the values are not checked (a check would be a host sync
  per call): the kernels clamp every index into the tensors and give the defined result
  documented in ``fastlm.attention_varlen`` (NaN everywhere) for bad values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastlm import _cuda_ext
from fastlm.ops import _checks as C

OP = "attention"
OP_VARLEN = "attention_varlen"
PADDED_LAYOUT = "(batch, seq, heads, head_dim)"
PACKED_LAYOUT = "(total_tokens, heads, head_dim)"


# Not frozen: a frozen dataclass pays object.__setattr__ per field (0.65 against 0.19 us
# per record, measured); records are built once per call and never modified.
@dataclass(slots=True)
class AttentionCall:
    """One attention call, padded or packed.

    Padded: q (B, Sq, H, D), k/v (B, Sk, Hkv, D), key_padding_mask bool (B, Sk) or None;
    max_seqlen_q/k are Sq/Sk. Packed: q (total_q, H, D), k/v (total_k, Hkv, D),
    cu_seqlens_q/k int32 (B + 1,). softmax_scale is resolved (the default already applied).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    softmax_scale: float
    dropout_p: float

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def op(self) -> str:
        return OP_VARLEN if self.varlen else OP

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.varlen else self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    def aligned16(self) -> tuple[bool, bool, bool]:
        """Whether q, k, v are 16-byte aligned: every stride but the last a multiple of 16
        bytes and, outside torch.compile, the data address too. Under torch.compile
        data_ptr() cannot be traced and a graph input's address is not fixed at trace time:
        there only the strides count (the CUDA binding checks the address at run time)."""
        address = not torch.compiler.is_compiling()
        return tuple(_cuda_ext.aligned(t, address=address) for t in (self.q, self.k, self.v))

    def dispatch_key(self) -> tuple:
        aligned = self.aligned16() if self.device.type == "cuda" else None
        return (
            self.device,
            self.q.dtype,
            self.varlen,
            self.batch,
            self.heads,
            self.head_dim,
            self.dropout_p > 0,
            aligned,
        )

    @classmethod
    def checked(
        cls, q, k, v, *, causal, key_padding_mask, softmax_scale, dropout_p
    ) -> AttentionCall:
        """Validate a padded call (fastlm.attention) and build its record. The usual, valid
        call is recognised in a few attribute reads (_plainly_valid); anything else gets
        every check (_validate_padded)."""
        if _plainly_valid(q, k, v, causal, key_padding_mask, softmax_scale, dropout_p):
            d = q.shape[-1]
            scale = C.default_softmax_scale(d) if softmax_scale is None else softmax_scale
            p = float(dropout_p)
        else:
            scale, p = _validate_padded(q, k, v, causal, key_padding_mask, softmax_scale, dropout_p)
        return cls(q, k, v, key_padding_mask, None, None, q.shape[1], k.shape[1], causal, scale, p)

    @classmethod
    def checked_varlen(
        cls, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
        causal, softmax_scale, dropout_p,
    ) -> AttentionCall:  # fmt: skip
        """Validate a packed call (fastlm.attention_varlen) and build its record."""
        _check_qkv(OP_VARLEN, q, k, v, 3, PACKED_LAYOUT)
        _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q)
        scale, p = _check_scalars(OP_VARLEN, q, causal, softmax_scale, dropout_p)
        _check_cu_seqlens_values(
            cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k
        )
        return cls(
            q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, p
        )  # fmt: skip


_FLOAT = frozenset(C.FLOAT_DTYPES)


def _plainly_valid(q, k, v, causal, key_padding_mask, softmax_scale, dropout_p) -> bool:
    """A cheap sufficient condition for _validate_padded to pass: plain 4-D tensors of one
    supported dtype on one device with unit last-dim strides, matching batch/head_dim,
    GQA-divisible heads, a bool (B, Sk) mask or none, and plain scalars in range. The hot
    path of every model; False only means "check everything", never "invalid"."""
    for t in (q, k, v):
        if type(t) is not torch.Tensor or t.dim() != 4 or (t.shape[3] != 1 and t.stride(3) != 1):
            return False
    if q.dtype not in _FLOAT or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    bsz, _, heads, d = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[3] != d or d < 1:
        return False
    kv_heads = k.shape[2]
    if kv_heads < 1 or heads % kv_heads:
        return False
    device = q.device
    if k.device != device or v.device != device:
        return False
    if key_padding_mask is not None and (
        type(key_padding_mask) is not torch.Tensor or key_padding_mask.dtype != torch.bool
        or key_padding_mask.shape != (bsz, k.shape[1]) or key_padding_mask.device != device
    ):  # fmt: skip
        return False
    if type(causal) is not bool or type(dropout_p) not in (float, int):
        return False
    if not 0.0 <= dropout_p < 1.0:
        return False
    return softmax_scale is None or (type(softmax_scale) is float and 0 < softmax_scale < math.inf)


def _validate_padded(q, k, v, causal, key_padding_mask, softmax_scale, dropout_p):
    """Every check of a padded call -> (resolved scale, dropout_p as float)."""
    _check_qkv(OP, q, k, v, 4, PADDED_LAYOUT)
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            f"fastlm.{OP}: q and k must have the same batch size, got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}"
        )
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, k.shape[0], k.shape[1], q)
    return _check_scalars(OP, q, causal, softmax_scale, dropout_p)


def _check_qkv(op: str, q: object, k: object, v: object, ndim: int, layout: str) -> None:
    """Type, dtype, device, rank, contiguous last dim, k and v alike, matching head dims,
    GQA divisibility."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.check_tensor(op, name, t)
        C.check_float(op, name, t)
        C.check_dim(op, name, t, ndim, layout)
    C.check_same_dtype(op, "q", q, k=k, v=v)
    C.check_same_device(op, "q", q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.check_last_dim_contiguous(op, name, t)
    if k.shape != v.shape:
        raise ValueError(
            f"fastlm.{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"fastlm.{op}: q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}"
        )
    C.check_head_dim(op, q.shape[-1])
    C.check_gqa(op, q.shape[-2], k.shape[-2])


def _check_scalars(
    op: str, q: torch.Tensor, causal: object, softmax_scale: object, dropout_p: object
) -> tuple[float, float]:
    """causal, softmax_scale, dropout_p -> (resolved scale, dropout_p as float)."""
    C.check_flag(op, "causal", causal)
    C.check_softmax_scale(op, softmax_scale)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"fastlm.{op}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastlm.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    scale = C.default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    return float(scale), float(dropout_p)


def _check_key_padding_mask(mask: object, batch: int, seq_k: int, q: torch.Tensor) -> None:
    C.check_tensor(OP, "key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(
            f"fastlm.{OP}: key_padding_mask must be a bool tensor (True = attend), got "
            f"{str(mask.dtype).replace('torch.', '')}"
        )
    C.check_shape(OP, "key_padding_mask", mask, (batch, seq_k))
    C.check_same_device(OP, "q", q, key_padding_mask=mask)


def _check_cu_seqlens(cu_q, cu_k, max_seqlen_q, max_seqlen_k, q: torch.Tensor) -> None:
    """Types, dtypes, shapes and devices of cu_seqlens_q/k; max_seqlen_q/k non-negative ints."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        C.check_tensor(OP_VARLEN, name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(
                f"fastlm.{OP_VARLEN}: {name} must be int32, got {str(cu.dtype).replace('torch.', '')}"
            )
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(
                f"fastlm.{OP_VARLEN}: {name} must be 1-D with batch + 1 >= 2 entries, got shape "
                f"{tuple(cu.shape)}"
            )
    C.check_same_device(OP_VARLEN, "q", q, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"fastlm.{OP_VARLEN}: cu_seqlens_q and cu_seqlens_k must have the same length "
            f"(batch + 1), got {cu_q.numel()} and {cu_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"fastlm.{OP_VARLEN}: {name} must be a non-negative int, got {m!r}")


def cu_seqlens_invalid(cu: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """A 0-d bool tensor on cu's device, True unless cu starts at 0, is non-decreasing,
    ends at ``total`` and has no step above ``max_seqlen`` (no host read)."""
    lens = cu[1:] - cu[:-1]
    return (cu[0] != 0) | (cu[-1] != total) | (lens < 0).any() | (lens > max_seqlen).any()


def _check_cu_seqlens_values(cu_q, cu_k, total_q, total_k, max_seqlen_q, max_seqlen_k) -> None:
    """The values of cu_seqlens: see the module docstring for when and how."""
    compiling = torch.compiler.is_compiling()
    if not compiling and cu_q.device.type != "cpu":
        return  # no host sync: the kernels bound every index (fastlm.attention_varlen docs)
    bad = cu_seqlens_invalid(cu_q, total_q, max_seqlen_q) | cu_seqlens_invalid(
        cu_k, total_k, max_seqlen_k
    )
    if compiling:
        torch._assert_async(
            ~bad, f"fastlm.{OP_VARLEN}: invalid cu_seqlens or max_seqlen (see its docs)"
        )
    elif bool(bad):  # a CPU tensor: reading it is free
        raise ValueError(
            f"fastlm.{OP_VARLEN}: cu_seqlens must start at 0, be non-decreasing and end at the "
            f"number of tokens (q {total_q}, k {total_k}), with no sequence longer than "
            f"max_seqlen (q {max_seqlen_q}, k {max_seqlen_k}); got cu_seqlens_q "
            f"{cu_q.tolist()} and cu_seqlens_k {cu_k.tolist()}"
        )
