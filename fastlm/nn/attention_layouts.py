"""How a batch's tokens are laid out for attention, and the fastlm op that serves each
layout: the one place models and nn modules turn (q, k, v) into attention outputs.

* :class:`Packed`  the valid tokens of all sequences back to back, (T, n, d), with int32
  ``cu_seqlens`` offsets: fastlm.attention_varlen, no padding computed;
* :class:`Padded`  (B, S, n, d), or its (B * S, n, d) rows, with an optional bool (B, S)
  ``key_padding_mask`` (True = token): fastlm.attention;
* :class:`Cached`  a decode step over a preallocated KV cache (B, S_max, n_kv, d) with
  ``cache_seqlens`` tokens already in it; the step's k, v are appended in place:
  fastlm.attention_with_kvcache.

``attend(q, k, v, causal=..., softmax_scale=..., dropout_p=..., backend=...)`` returns the
output in q's layout. Each layout is a small frozen record built once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlm.ops.attention import attention, attention_varlen
from fastlm.ops.attention_kvcache import attention_with_kvcache


@dataclass(frozen=True)
class Packed:
    """Sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]; no sequence is longer than max_seqlen."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    def attend(self, q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, backend=None):
        """q (T, n, d), k, v (T, n_kv, d) -> (T, n, d)."""
        cu, m = self.cu_seqlens, self.max_seqlen
        return attention_varlen(
            q, k, v, cu, cu, m, m, causal=causal, softmax_scale=softmax_scale,
            dropout_p=dropout_p, backend=backend,
        )  # fmt: skip


@dataclass(frozen=True)
class Padded:
    """All batch * seq positions; padded keys are masked (queries at padding are computed
    and ignored by the caller)."""

    batch: int
    seq: int
    key_padding_mask: torch.Tensor | None

    def attend(self, q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, backend=None):
        """q (B, S, n, d) or its (B * S, n, d) rows (k, v alike with n_kv heads) -> q's shape."""
        out = attention(
            q.view(self.batch, self.seq, *q.shape[-2:]),
            k.view(self.batch, self.seq, *k.shape[-2:]),
            v.view(self.batch, self.seq, *v.shape[-2:]),
            causal=causal, key_padding_mask=self.key_padding_mask, softmax_scale=softmax_scale,
            dropout_p=dropout_p, backend=backend,
        )  # fmt: skip
        return out.view(q.shape)


@dataclass(frozen=True)
class Cached:
    """One layer's KV cache: k_cache, v_cache (B, S_max, n_kv, d); cache_seqlens int32 (B,)
    tokens already cached (not advanced here: the cache owner advances it)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor

    def attend(self, q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, backend=None):
        """q (B, Sq, n, d); the step's k, v (B, Sq, n_kv, d) are appended -> (B, Sq, n, d).
        Decoding is inference: dropout must be 0."""
        if dropout_p:
            raise NotImplementedError(
                f"attention over a KV cache has no dropout (inference only), got dropout_p={dropout_p}"
            )
        return attention_with_kvcache(
            q, self.k_cache, self.v_cache, self.cache_seqlens, k=k, v=v, causal=causal,
            softmax_scale=softmax_scale, backend=backend,
        )  # fmt: skip
