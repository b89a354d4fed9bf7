"""fastlm.attention and fastlm.attention_varlen: fused scaled dot-product attention.

    attention(q, k, v)         q (B, Sq, H, D), k/v (B, Sk, Hkv, D)      -> (B, Sq, H, D)
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
                               q (total_q, H, D), k/v (total_k, Hkv, D)  -> (total_q, H, D)

    S = scale * q k^T (scale defaults to 1/sqrt(D)),  P = softmax over the allowed keys,
    O = (P * Z / (1 - p)) v        Z: the dropout keep-mask (all ones without dropout)

Causal masks align bottom-right (query i sees keys j <= i + Sk - Sq, as FlashAttention
2.1+); key_padding_mask is bool (B, Sk), True = attend; grouped-query attention when Hkv
divides H (query head h reads kv head h // (H // Hkv)). Rows with no key to attend to
give zeros and zero gradients. Math in fastlm.reference.attention.

Non-finite inputs (NaN, inf), backend by backend:

* a key a query may not see (key_padding_mask False, or causally hidden) never reaches
  that query's output on the reference and triton backends (the cuda kernels mask scores
  the same way). On CPU the torch backend matches them where SDPA applies the causal mask
  itself or no mask is needed (causal with Sq == Sk and no key_padding_mask; no mask at
  all); where it hands SDPA a boolean mask (any key_padding_mask; causal with Sq != Sk;
  a packed call's group of sequences of unequal lengths on CPU, see _length_groups.py;
  every packed call on CUDA or under torch.compile) SDPA adds -inf to a NaN score, and
  every query the key is hidden from gets NaN. Zeroing hidden keys first would cost a
  pass over k on every call;
* a NaN query row gives NaN in that row only on the reference and triton backends (zeros
  if it sees no key); on CPU the torch backend gives NaN there where it passes SDPA a
  boolean mask and zeros where it does not. Making the latter NaN would cost a pass over
  the output. (On CUDA the torch backend's results in these two cases are whatever
  SDPA's CUDA kernels give: other rows are never affected);
* a NaN or inf value row a query may not see can still reach that query's output on every
  backend, the reference included (a zero probability times NaN is NaN inside P @ V).

Keep what a query may not see finite (e.g. zero the padding) where this matters.

Dropout (dropout_p > 0): a seed is drawn from torch's default CPU generator per call, so
a fixed torch.manual_seed reproduces the mask. The Triton kernels draw it with a
counter-based RNG (keep element (b, h, i, j) from ((b * H + h) * Sq + i) * Sk + j and the
seed); the reference backend with torch.rand; the torch backend is SDPA's own dropout.
``dropout_mask`` materialises the first two for tests.

Layout of this folder (the same for every op):
    call.py        the call record (AttentionCall) and all argument checks
    _op.py         the custom ops (fake + autograd) that run the kernel backends
    _triton.py _cuda.py _torch.py _reference.py   one file per backend, each with
                   reason(call) -> str | None (all its limits) and its implementation
"""

from __future__ import annotations

import torch

from fastlm import backends
from fastlm.ops import _autocast
from fastlm.ops.attention._op import BACKENDS, draw_seed, dropout_mask, run
from fastlm.ops.attention.call import OP, OP_VARLEN, AttentionCall

__all__ = [
    "BACKENDS",
    "OP",
    "OP_VARLEN",
    "AttentionCall",
    "attention",
    "attention_varlen",
    "draw_seed",
    "dropout_mask",
]


def _serve(call: AttentionCall, backend: str | None) -> torch.Tensor:
    chosen = backends.choose(call.op, call, BACKENDS, backend)
    native = _NATIVE_RUNS.get(chosen)
    if native is not None:
        return native(call)
    return run(call, chosen)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, Sq, H, D), k/v (B, Sk, Hkv, D).

    Inputs may have any strides with a contiguous last dim (views of a fused QKV
    projection or of (B, H, S, D) tensors transposed to (B, S, H, D) work without copies).
    ``causal`` aligns bottom-right; ``key_padding_mask`` bool (B, Sk), True = attend;
    ``softmax_scale`` defaults to 1/sqrt(D) and must be positive and finite;
    ``dropout_p`` > 0 applies dropout to the attention probabilities (pass 0 in eval).
    fp16, bf16, fp32. Returns (B, Sq, H, D) contiguous in q's dtype. NaN and inf in the
    inputs: see the module docstring (the backends differ).
    """
    if (low := _autocast.dtype_for(q)) is not None:
        with _autocast.disabled(q.device):  # SDPA's policy: q, k, v in the autocast dtype
            return attention(
                *_autocast.cast(low, q, k, v), causal=causal, key_padding_mask=key_padding_mask,
                softmax_scale=softmax_scale, dropout_p=dropout_p, backend=backend,
            )  # fmt: skip
    call = AttentionCall.checked(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask,
        softmax_scale=softmax_scale, dropout_p=dropout_p,
    )  # fmt: skip
    return _serve(call, backend)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: q (total_q, H, D), k/v (total_k, Hkv, D).

    Sequence b holds tokens cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (likewise k/v) and
    attends only within itself. cu_seqlens_* are int32 (batch + 1,) on q's device, any
    stride; max_seqlen_* bound the lengths. Returns (total_q, H, D) contiguous.

    The values must start at 0, be non-decreasing, end at the token count and have no
    step above max_seqlen. They are checked where that costs no host sync: on CPU tensors
    (ValueError) and under torch.compile (a device-side assert). On CUDA tensors in eager
    mode they are not checked (that would be a host sync per call); there the kernels
    clamp every sequence into the tensors, so wrong values never read or write outside
    q, k, v or the output, and the defined result of invalid values is NaN in every
    element of the output (and of the gradients). NaN and inf in q, k, v: as for
    ``attention`` (module docstring), per sequence.
    """
    if (low := _autocast.dtype_for(q)) is not None:
        with _autocast.disabled(q.device):
            return attention_varlen(
                *_autocast.cast(low, q, k, v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                backend=backend,
            )  # fmt: skip
    call = AttentionCall.checked_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
    )  # fmt: skip
    return _serve(call, backend)


_NATIVE_RUNS = backends.native_runs(BACKENDS)
