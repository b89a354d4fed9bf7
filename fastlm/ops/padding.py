"""fastlm.unpad_input / fastlm.pad_input: between padded (B, S, ...) batches and packed tokens.

    packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden, attention_mask)
    hidden_again = pad_input(packed, indices, batch, seqlen)      # zeros at padding

``indices`` are the flat positions b * S + s of the real tokens in row-major order, so the
tokens of sequence b are packed[cu_seqlens[b]:cu_seqlens[b + 1]] (the layout of
fastlm.attention_varlen). Both directions are plain torch gathers/scatters (memory moves)
and differentiable: the gradient of a gather is a scatter and vice versa.

torch.compile: pad_input traces into one graph (its index range check becomes a device-side
assert there). unpad_input has a data-dependent output
size (the number of tokens) and returns max_seqlen as a python int, so a full graph needs
``torch._dynamo.config.capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs``.
"""

from __future__ import annotations

import torch

from fastlm.ops import _checks as C

_INDEX_DTYPES = (torch.int64, torch.int32)


def _mask_as_bool(op: str, attention_mask: object, hidden: torch.Tensor) -> torch.Tensor:
    C.check_tensor(op, "attention_mask", attention_mask)
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(
            f"fastlm.{op}: attention_mask must be bool or an integer dtype (1 = token, 0 = padding), "
            f"got {str(attention_mask.dtype).replace('torch.', '')}; an additive float mask is ambiguous"
        )
    C.check_shape(op, "attention_mask", attention_mask, tuple(hidden.shape[:2]))
    C.check_same_device(op, "hidden", hidden, attention_mask=attention_mask)
    # Any non-zero value marks a token; the counts below use the same bool mask, so
    # cu_seqlens always agrees with indices.
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def unpad_input(
    hidden: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Keep the real tokens of ``hidden`` (B, S, ...) where ``attention_mask`` (B, S) is set.

    attention_mask: bool or integer, 1/True = token (the Hugging Face sense). Returns
    packed (total, ...), indices (total,) int64 flat positions b * S + s, cu_seqlens
    (B + 1,) int32 and max_seqlen (python int). Differentiable w.r.t. ``hidden``.
    """
    op = "unpad_input"
    C.check_tensor(op, "hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(
            f"fastlm.{op}: hidden must be (batch, seq, ...), got shape {tuple(hidden.shape)}"
        )
    mask = _mask_as_bool(op, attention_mask, hidden)
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    packed = hidden.flatten(0, 1).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def _check_index_range(op: str, indices: torch.Tensor, slots: int) -> None:
    """Every index must name a slot: 0 <= i < batch * seqlen. A negative index would be taken
    from the end (torch indexing) and land on a wrong token without any error.

    Eager CPU tensors: checked now, ValueError (reading the values is free). Other devices
    and torch.compile: reading them would be a host sync per call (or a graph break), so the
    check runs on the device instead (``torch._assert_async``): a bad index fails with a
    device-side assert at the next synchronizing call.
    """
    in_range = (indices >= 0) & (indices < slots)
    if indices.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(in_range.all(), f"fastlm.{op}: indices outside [0, batch * seqlen)")
    elif not bool(in_range.all()):
        bad = indices[~in_range][0].item()
        raise ValueError(
            f"fastlm.{op}: indices must lie in [0, batch * seqlen = {slots}), got {bad}"
        )


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: scatter packed (total, ...) rows to flat positions ``indices``
    of a zero (batch, seqlen, ...) tensor. Differentiable w.r.t. ``packed``."""
    op = "pad_input"
    C.check_tensor(op, "packed", packed)
    C.check_tensor(op, "indices", indices)
    if packed.dim() < 1:
        raise ValueError(f"fastlm.{op}: packed must be (total_tokens, ...), got a 0-d tensor")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"fastlm.{op}: indices must be int64 (or int32), got {str(indices.dtype).replace('torch.', '')}"
        )
    C.check_shape(op, "indices", indices, (packed.shape[0],))
    C.check_same_device(op, "packed", packed, indices=indices)
    for name, n in (("batch", batch), ("seqlen", seqlen)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"fastlm.{op}: {name} must be a non-negative int, got {n!r}")
    _check_index_range(op, indices, batch * seqlen)
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    out = out.index_put((indices,), packed)
    return out.view(batch, seqlen, *packed.shape[1:])
