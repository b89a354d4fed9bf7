"""Recognise the mask functions transformers builds, so that fastlm can serve them fused.

transformers (>= 5.0) describes a mask as a function ``(batch, head, q_idx, kv_idx) -> bool``
and hands it to the registered mask hook. Two of its shapes have a fused fastlm equivalent:

* the plain ``causal_mask_function`` / ``bidirectional_mask_function`` (with or without a
  2-D padding mask): ``fastlm.attention`` with ``causal`` and ``key_padding_mask``;
* packed, padding-free batches (restarting ``position_ids``, as made by
  ``DataCollatorWithFlattening``), which ``create_causal_mask`` builds as
  ``and_masks(remap_positions_for_packed_sequence(causal, position_ids),
  packed_sequence_mask_function(segment_ids))``: ``fastlm.attention_varlen`` over the
  segments.

The packed form is recognised structurally (the closures' names and captured variables),
never by evaluating the mask, and not under torch.compile (which cannot trace that).
Anything that does not match exactly returns None and is materialised instead, so a change
in transformers can cost speed but never correctness.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def plain_mask_kind(mask_function: Callable) -> str | None:
    """'causal' or 'bidirectional' for transformers' two plain mask functions, else None."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is getattr(mu, "bidirectional_mask_function", None):
        return "bidirectional"
    return None


def _captured(fn: Callable, factory: str) -> dict[str, object] | None:
    """The closure variables of ``fn`` when it is the inner function that transformers'
    ``masking_utils.<factory>`` returns, else None."""
    code = getattr(fn, "__code__", None)
    if (
        code is None
        or getattr(fn, "__module__", None) != "transformers.masking_utils"
        or not getattr(fn, "__qualname__", "").startswith(f"{factory}.<locals>.")
        or fn.__closure__ is None
    ):
        return None
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}


def packed_segment_ids(mask_function: Callable) -> tuple[torch.Tensor, str] | None:
    """(segment_ids (B, S), kind) when ``mask_function`` is transformers' packed-sequence mask
    over a plain causal or bidirectional mask, else None.

    ``segment_ids[b, i]`` numbers the sequence that token i of row b belongs to (a new
    sequence starts where ``position_ids`` does not step by exactly 1); the mask is
    ``same_segment(q, k) and kind(position[q], position[k])``. Positions inside a segment are
    consecutive, so ``kind`` over positions equals ``kind`` over token indices there: the
    whole mask is ``kind`` attention within each segment, i.e. varlen attention.
    """
    if plain_mask_kind(mask_function) is not None or torch.compiler.is_compiling():
        return None  # a plain mask; or traced, where closures cannot be inspected
    outer = _captured(mask_function, "and_masks")
    if outer is None or len(outer.get("mask_functions", ())) != 2:
        return None
    remapped, packed = outer["mask_functions"]
    remap_vars = _captured(remapped, "remap_positions_for_packed_sequence")
    packed_vars = _captured(packed, "packed_sequence_mask_function")
    if remap_vars is None or packed_vars is None:
        return None
    kind = plain_mask_kind(remap_vars.get("mask_function"))
    segment_ids = packed_vars.get("packed_sequence_mask")
    if kind is None or not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2:
        return None
    return segment_ids, kind


def cu_seqlens_from_segment_ids(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 (N + 1,), max_seqlen) of the sequences in a (B, S) segment-id map,
    rows flattened in order: a sequence starts at every row start and wherever the id
    changes. Reads the boundaries back to the host (like transformers' flash-attention path:
    varlen attention needs the sequence count), a sync on a GPU."""
    batch, seq = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = starts.reshape(-1).nonzero().reshape(-1)
    end = torch.full((1,), batch * seq, dtype=first.dtype, device=first.device)
    cu_seqlens = torch.cat([first, end]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
