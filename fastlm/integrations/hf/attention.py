"""attn_implementation="fastlm": transformers' attention and mask hooks backed by fastlm.attention.

transformers 5.x builds the attention mask through AttentionMaskInterface[impl] and runs
attention through AttentionInterface[impl]. Both are registered under "fastlm":

* :func:`fastlm_mask` hands the (B, Sk) bool padding mask through unchanged instead of a
  4D float bias (None when there is no mask, or an eager CPU mask with nothing padded): fastlm.attention takes padding as
  ``key_padding_mask`` and causality as a flag. Registering only the attention function
  would make transformers drop the mask for unknown implementations: padded inputs would
  silently attend to padding.
* :func:`fastlm_attention_forward` gets query/key/value (B, H, S, D), views them as
  (B, S, H, D) (a transpose, no copy) and returns ((B, Sq, H, D), None).

Mask patterns fastlm cannot express (sliding windows, packed-sequence masks, custom
or/and overlays, a prepared 4D mask) raise NotImplementedError rather than being ignored.
"""

from __future__ import annotations

import torch

from fastlm.models._base import drop_full_mask
from fastlm.ops.attention import attention


def _plain_mask_kind(mask_function) -> str | None:
    """'causal' or 'bidirectional' for transformers' two plain mask functions, else None."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is getattr(mu, "bidirectional_mask_function", None):
        return "bidirectional"
    return None


def fastlm_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """AttentionMaskInterface entry: the (B, kv_length) bool padding mask, or None."""
    kind = _plain_mask_kind(mask_function) if mask_function is not None else "causal"
    if kind is None:
        raise NotImplementedError(
            "attn_implementation='fastlm' supports plain causal or bidirectional masks with padding; "
            f"got mask function {getattr(mask_function, '__name__', mask_function)!r} "
            "(sliding window, packed sequences or a custom overlay)"
        )
    if (
        kind == "causal"
        and isinstance(q_offset, int)
        and isinstance(kv_length, int)
        and q_offset + q_length != kv_length
    ):
        raise NotImplementedError(
            "attn_implementation='fastlm': the causal mask must end at the last key (queries are the newest "
            f"tokens); got q_offset {q_offset} + q_length {q_length} != kv_length {kv_length}"
        )
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] != kv_length:
        raise ValueError(
            f"attn_implementation='fastlm': attention_mask covers {mask.shape[1]} keys, the attention has {kv_length}"
        )
    # An all-ones mask can be dropped (the kernels skip the mask loads, SDPA keeps its
    # unmasked path), but finding out reads its values: free on an eager CPU tensor, a host
    # sync per forward on a GPU and a graph break under torch.compile. So only eager CPU
    # masks are inspected; otherwise the mask is always passed through.
    return drop_full_mask(mask)


def fastlm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: query/key/value (B, H, S, D) -> ((B, Sq, H, D), None)."""
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            "attn_implementation='fastlm' does not support sliding-window attention"
        )
    if attention_mask is not None and (
        attention_mask.dim() != 2 or attention_mask.dtype != torch.bool
    ):
        raise NotImplementedError(
            "attn_implementation='fastlm' expects the (batch, keys) bool padding mask made by its mask function; "
            f"got a {attention_mask.dim()}-D {attention_mask.dtype} mask (a prepared 4D mask is not supported)"
        )
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = bool(getattr(module, "is_causal", False))
    out = attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=bool(causal),  # bottom-right aligned: a decode query sees the whole cache
        key_padding_mask=attention_mask,
        softmax_scale=scaling,
        dropout_p=float(dropout),
        backend=getattr(module, "fastlm_backend", None),
    )
    return out, None
