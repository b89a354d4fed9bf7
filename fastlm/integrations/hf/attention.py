"""attn_implementation="fastlm": transformers' attention and mask hooks backed by fastlm.attention.

transformers 5.x builds the attention mask through AttentionMaskInterface[impl] and runs
attention through AttentionInterface[impl]. Both are registered under "fastlm" (registering
only the attention hook would make transformers drop the mask for unknown implementations:
padded inputs would silently attend to padding). The mask hook, :func:`fastlm_mask`, hands
the attention hook, :func:`fastlm_attention_forward`, one of four mask forms: None, a 2-D
bool padding mask, 2-D integer segment ids, or a 4-D mask.

Fused (fastlm kernels):

* plain causal or bidirectional attention, with or without padding: ``None`` or the
  (B, Sk) bool padding mask -> ``fastlm.attention(causal=..., key_padding_mask=...)``;
* a decode step (one causal query at ``q_offset``, any cache): the (B, kv_length) bool mask
  of the keys up to the query's own that the padding keeps, ``q_offset`` compared on the
  device, never read. A static cache's empty slots are masked, not cut off: the mask's
  shape must not follow the step, because generate builds it eagerly and passes it to the
  forward it compiled for decoding (a length that grew every step would recompile it);
* several queries into a static cache (``cache_implementation="static"``: queries at
  ``q_offset``, ``kv_length`` = the cache size), when the offset can be read for free (an
  int or an eager CPU tensor): causal attention can see no key at or past
  ``L = q_offset + Sq``, so the hook hands over the (B, L) bool padding mask and the
  attention runs bottom-right causal over the first L cached keys (the empty slots are cut
  off, not computed);
* packed, padding-free batches (restarting ``position_ids``, ``DataCollatorWithFlattening``):
  the (B, S) integer segment ids -> ``cu_seqlens`` -> ``fastlm.attention_varlen``, as
  transformers' flash-attention path does (it reads the sequence count back to the host).

Fallback (logged once per reason):

* any other mask function (sliding windows, or/and overlays, block overlays, several
  queries into a static cache whose offset is a GPU tensor or traced by torch.compile):
  materialised as a (B, 1, Sq, Sk) bool mask by transformers' own ``sdpa_mask`` -> torch
  SDPA;
* a 4-D bool or additive float mask (custom, or prepared by the model): torch SDPA with it;
* ``output_attentions=True``: that call runs an explicit softmax over the dense form of
  whichever mask it got and returns the probabilities (B, H, Sq, Sk), with gradients.

Every fallback computes exactly what transformers' sdpa (or, for attention outputs, eager)
path computes, and is logged once per reason; nothing that transformers runs raises.
``output_attentions`` is not passed to attention functions in transformers 5.x: it is read
from transformers' output collector, which is what fills ``outputs.attentions``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention

from fastlm.integrations.hf.log import log_once
from fastlm.integrations.hf.mask_patterns import (
    cu_seqlens_from_segment_ids,
    packed_segment_ids,
    plain_mask_kind,
)
from fastlm.models._base import drop_full_mask, reads_are_free
from fastlm.ops.attention import attention, attention_varlen


def _log_fallback(reason: str) -> None:
    log_once("attn_implementation='fastlm'", reason)


def _host_int(value) -> int | None:
    """``value`` as a Python int when reading it is free: an int, or an eager CPU tensor (on
    a GPU it would be a device sync, under torch.compile a graph break)."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and reads_are_free(value):
        return int(value)
    return None


def _over_keys(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A 2-D padding mask as bool over exactly ``n`` keys: cut, or extended with masked
    columns (keys past the 2-D mask are empty, as in transformers' ``prepare_padding_mask``)."""
    mask = mask.to(torch.bool)
    if mask.shape[1] < n:
        mask = F.pad(mask, (0, n - mask.shape[1]), value=False)
    return mask[:, :n]


def _padding_mask(attention_mask: torch.Tensor | None, valid: int, kv_length: int):
    """The (B, valid) bool padding mask over the first ``valid`` keys, or None when nothing
    is masked and ``valid == kv_length``."""
    if attention_mask is None:
        return None
    mask = _over_keys(attention_mask, valid)
    # An all-ones mask can be dropped (the kernels skip the mask loads, SDPA keeps its
    # unmasked path) where reading it is free; a mask shorter than the keys is kept: its
    # length is what cuts the empty cache slots off.
    return drop_full_mask(mask) if valid == kv_length else mask


def _decode_mask(batch_size: int, kv_length: int, q_offset, attention_mask):
    """(B, kv_length) bool, the keys one causal query at position ``q_offset`` attends: those
    up to its own that the padding mask keeps (a static cache's empty slots are masked).

    Its shape follows the cache, never the step, and ``q_offset`` (an int or a device
    tensor) is compared on the device, never read: generate builds this mask eagerly and
    hands it to the forward it compiled for the decode steps, where a mask whose length
    follows the step would recompile that forward at every step."""
    on = q_offset if isinstance(q_offset, torch.Tensor) else attention_mask
    keys = torch.arange(kv_length, device=None if on is None else on.device)
    mask = (keys <= q_offset)[None].expand(batch_size, kv_length)
    if attention_mask is not None:
        mask = mask & _over_keys(attention_mask, kv_length).to(mask.device)
    return drop_full_mask(mask)


def _fused_mask(kind, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask):
    """The fused form of a plain causal/bidirectional mask, or False when it has none."""
    if _host_int(kv_offset) != 0:
        return False
    if kind == "causal" and q_length == 1:
        return _decode_mask(batch_size, kv_length, q_offset, attention_mask)
    q_offset = _host_int(q_offset)
    if q_offset is None:
        return False
    # Causal: keys past q_offset + q_length are masked for every query (a static cache's
    # empty slots), so attending over the first ``valid`` keys bottom-right is exact.
    valid = q_offset + q_length if kind == "causal" else kv_length
    if valid > kv_length:
        return False
    mask = _padding_mask(attention_mask, valid, kv_length)
    if mask is None and valid < kv_length:
        mask = torch.ones(batch_size, valid, dtype=torch.bool)  # carries ``valid`` to the forward
    return mask


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
    """AttentionMaskInterface entry: None, a 2-D bool padding mask, 2-D segment ids or a 4-D
    bool mask (see the module docstring)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    kind = plain_mask_kind(mask_function)
    if kind is not None:
        fused = _fused_mask(
            kind, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask
        )
        if fused is not False:
            return fused if fused is None else fused.to(kwargs.get("device", fused.device))
    packed = packed_segment_ids(mask_function)
    if packed is not None and attention_mask is None and q_length == kv_length:
        return packed[0]
    name = getattr(mask_function, "__name__", type(mask_function).__name__)
    _log_fallback(
        f"mask function {name!r} (or a cache offset read only at a cost) is materialised, torch SDPA"
    )
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=kwargs.get("use_vmap", False),
        device=kwargs.get("device", "cpu"),
    )


def attentions_requested() -> bool:
    """Whether transformers is collecting attention probabilities for this forward."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capturing passes output_attentions
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _dense_mask(mask, q_length: int, kv_length: int, causal: bool, device) -> torch.Tensor | None:
    """Any mask form of :func:`fastlm_mask` with the causal flag as a 4-D mask over
    (B|1, 1, Sq, Sk): bool (True attends) or the additive float mask as given."""
    if mask is not None and mask.dim() == 4:
        return mask
    q_idx = torch.arange(q_length, device=device)[:, None]
    k_idx = torch.arange(kv_length, device=device)[None, :]
    if mask is not None and not mask.is_floating_point() and mask.dtype != torch.bool:
        same = mask[:, :, None] == mask[:, None, :]  # packed: segment ids, Sq == Sk
        return (same & (k_idx <= q_idx) if causal else same)[:, None]
    valid = kv_length if mask is None else mask.shape[1]
    allowed = k_idx < valid
    if causal:
        allowed = allowed & (k_idx <= q_idx + valid - q_length)  # bottom-right
    if mask is None:
        return allowed[None, None]
    padding = F.pad(mask, (0, kv_length - valid), value=False)
    return allowed[None, None] & padding[:, None, None, :]


def _explicit_softmax_attention(query, key, value, mask, scaling, dropout):
    """Eager attention over (B, H, S, D) with a dense mask: ((B, Sq, H, D), probabilities)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2), probs


def fastlm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AttentionInterface entry: query/key/value (B, H, S, D) -> ((B, Sq, H, D), probabilities
    (B, H, Sq, Sk) when transformers collects attentions, else None)."""
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    dropout = float(dropout)
    mask = attention_mask
    if attentions_requested():
        _log_fallback("output_attentions: explicit softmax attention for those calls")
        dense = _dense_mask(mask, query.shape[2], key.shape[2], causal, query.device)
        return _explicit_softmax_attention(query, key, value, dense, scaling, dropout)
    if mask is not None and mask.dim() == 4:
        _log_fallback(f"a 4-D {mask.dtype} mask runs on torch SDPA")
        out = scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
        return out.transpose(1, 2), None
    backend = getattr(module, "fastlm_backend", None)
    if mask is not None and mask.dim() == 2 and mask.dtype != torch.bool:
        return _packed_attention(query, key, value, mask, causal, scaling, dropout, backend), None
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            "attn_implementation='fastlm' expects the mask made by its mask function (None, 2-D or 4-D); "
            f"got a {mask.dim()}-D {mask.dtype} mask"
        )
    valid = key.shape[2] if mask is None else mask.shape[1]  # static cache: empty slots cut off
    out = attention(
        query.transpose(1, 2),
        key[:, :, :valid].transpose(1, 2),
        value[:, :, :valid].transpose(1, 2),
        causal=causal,  # bottom-right aligned: a decode query sees the whole valid cache
        key_padding_mask=mask,
        softmax_scale=scaling,
        dropout_p=dropout,
        backend=backend,
    )
    return out, None


def _packed_attention(query, key, value, segment_ids, causal, scaling, dropout, backend):
    """Varlen attention within each segment of a packed (B, S) batch -> (B, S, H, D)."""
    batch, heads, seq, dim = query.shape
    cu_seqlens, max_seqlen = cu_seqlens_from_segment_ids(segment_ids)

    def tokens(x):  # (B, H, S, D) -> (B * S, H, D)
        return x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim)

    out = attention_varlen(
        tokens(query),
        tokens(key),
        tokens(value),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        causal=causal,
        softmax_scale=scaling,
        dropout_p=dropout,
        backend=backend,
    )
    return out.view(batch, seq, heads, dim)
