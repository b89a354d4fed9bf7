"""The custom ops behind fastlm.attention / attention_varlen for the kernel backends
(triton, cuda, reference): ``fastlm::attention_fwd`` / ``fastlm::attention_bwd`` with their
fake (meta) versions and the autograd formula, so the op composes with autograd and
torch.compile(fullgraph=True).

The forward returns (out, lse): lse is the backend's own row statistic, consumed only by
the same backend's backward (natural log-sum-exp for reference and cuda, base 2 for
triton; +inf on rows that see no key). Padded: (B, H, Sq); packed: (H, total_q).

Dropout: the seed is drawn from torch's default CPU generator per call (a 1-element int64
CPU tensor, not an int, so torch.compile keeps it a graph input) and saved for the
backward, which regenerates the same keep-mask.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from fastlm import backends
from fastlm.ops import _checks as C
from fastlm.ops import _eager
from fastlm.ops.attention import _cuda, _reference, _torch, _triton
from fastlm.ops.attention.call import AttentionCall

BACKENDS = {"triton": _triton, "cuda": _cuda, "torch": _torch, "reference": _reference}
_SEED_BOUND = 2**62
# Backends with a dropout_mask(seed, batch, heads, seq_q, seq_k, p, device) debug helper.
_DROPOUT_MASKS = {"triton": _triton, "reference": _reference}


def draw_seed() -> torch.Tensor:
    """A dropout seed from torch's default CPU generator, as a 1-element int64 CPU tensor."""
    return torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64)


def _call_args(call: AttentionCall) -> tuple:
    """The record's fields in order: the custom ops' leading arguments (built here only)."""
    return tuple(getattr(call, f.name) for f in fields(call))


@torch.library.custom_op("fastlm::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    call = AttentionCall(
        q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, softmax_scale, dropout_p,
    )  # fmt: skip
    return BACKENDS[backend].forward(call, seed)


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, *_):
    varlen = cu_seqlens_q is not None
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    call = AttentionCall(
        q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, softmax_scale, dropout_p,
    )  # fmt: skip
    return BACKENDS[backend].backward(call, seed, dout, out, lse)


@attention_bwd.register_fake
def _(dout, out, lse, q, k, v, *_):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_N_TENSORS = 6  # q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k lead the arguments


def _setup_context(ctx, inputs, output):
    *args, seed, backend = inputs
    ctx.save_for_backward(*output, seed, *args[:_N_TENSORS])
    ctx.scalars = (*args[_N_TENSORS:],)  # max_seqlen_q/k, causal, softmax_scale, dropout_p
    ctx.backend = backend


def _backward(ctx, dout, _dlse):
    # lse is an internal output (never returned by the public API): its gradient is ignored.
    out, lse, seed, *tensors = ctx.saved_tensors
    dout = C.unit_stride_last(dout)
    grads = attention_bwd(dout, out, lse, *tensors, *ctx.scalars, seed, ctx.backend)
    return *grads, *([None] * 10)


torch.library.register_autograd("fastlm::attention_fwd", _backward, setup_context=_setup_context)


def run(call: AttentionCall, backend: str) -> torch.Tensor:
    """The output of ``call`` on a kernel backend: through the custom op, or straight to
    the backend for eager calls without autograd (fastlm.ops._eager)."""
    seed = draw_seed() if call.dropout_p > 0 else None
    tensors = (call.q, call.k, call.v, call.key_padding_mask, call.cu_seqlens_q, call.cu_seqlens_k)
    if _eager.direct(*tensors):
        out, _ = BACKENDS[backend].forward(call, seed)
    else:
        out, _ = attention_fwd(*_call_args(call), seed, backend)
    return out


def dropout_mask(
    seed: int | torch.Tensor,
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    dropout_p: float,
    device: torch.device | str,
    *,
    backend: str = "triton",
) -> torch.Tensor:
    """Debug helper: the keep-mask (B, H, Sq, Sk) bool that ``backend`` ("triton" or
    "reference") uses for ``seed`` (an int, or a tensor from ``draw_seed``). For varlen
    calls Sq, Sk are max_seqlen_q, max_seqlen_k and sequence b uses the top-left corner of
    mask[b]. The torch backend's dropout is SDPA's own and cannot be materialised."""
    if backend not in _DROPOUT_MASKS:
        raise ValueError(
            f"fastlm.dropout_mask: backend must be one of {tuple(_DROPOUT_MASKS)}, got {backend!r}"
        )
    device = torch.device(device)
    if (why := backends.device_reason(backend, device)) is not None:
        raise backends.BackendUnavailableError(f"fastlm.dropout_mask: {why}")
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    return _DROPOUT_MASKS[backend].dropout_mask(seed, batch, heads, seq_q, seq_k, dropout_p, device)
