"""fastlm.attention_with_kvcache: attention of a few new tokens over a KV cache (decoding).

    out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k_new, v=v_new)

q (B, Sq, H, D); k_cache, v_cache (B, S_max, Hkv, D) preallocated, Hkv dividing H (GQA);
cache_seqlens (B,) int32 or a python int: tokens already in each sequence's cache. When
k, v (B, Sq, Hkv, D) are given they are written into the caches IN PLACE at rows
cache_seqlens[b] .. cache_seqlens[b] + Sq - 1 and attended to; cache_seqlens itself is not
updated (the caller advances it), as in FlashAttention's flash_attn_with_kvcache. With
L_b = cache_seqlens[b] (+ Sq when appending) keys in sequence b:

    out[b, i, h] = softmax_j(scale * q[b, i, h] . k_cache[b, j, h // G]) @ v_cache[b, j, h // G]
    over j < L_b, and when causal j <= L_b - Sq + i   (bottom-right: new token i sees keys
    up to cache_seqlens[b] + i),  G = H / Hkv,  scale = 1/sqrt(D) by default.

A query that sees no key (an empty cache, S_max = 0 included) gets zeros. Inference only.

Layout of this folder (the same for every op):
    call.py        the call record and all argument checks
    _op.py         the custom op (fake) that runs the kernel backends
    _triton.py _cuda.py _torch.py _reference.py   one file per backend, each with
                   reason(call) -> str | None (all its limits) and its implementation
"""

from __future__ import annotations

import torch

from fastlm import backends
from fastlm.ops import _autocast
from fastlm.ops.attention_kvcache._op import BACKENDS, run
from fastlm.ops.attention_kvcache.call import OP, KVCacheCall

__all__ = ["BACKENDS", "OP", "KVCacheCall", "attention_with_kvcache"]


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | int,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode attention over a KV cache, appending ``k``, ``v`` into it first (in place).

    q: (B, Sq, H, D); k_cache, v_cache: (B, S_max, Hkv, D), any strides with a contiguous
    last dim (when k, v are appended: no two rows sharing memory, so not expanded), Hkv
    dividing H; cache_seqlens: int32 (B,) or int, valid tokens already in
    the cache; k, v: (B, Sq, Hkv, D) or None. softmax_scale: a positive finite float, or
    None for 1/sqrt(D). Returns (B, Sq, H, D) in q's dtype; fp16, bf16, fp32.

    cache_seqlens is not advanced. Its values are checked on CPU (ValueError unless
    0 <= cache_seqlens[b] and cache_seqlens[b] + (Sq if appending) <= S_max); on CUDA that
    check would need a host sync, so an out-of-range sequence instead gets NaN outputs and
    its cache rows are left untouched. Not differentiable.
    """
    if (low := _autocast.dtype_for(q)) is not None:
        with _autocast.disabled(q.device):  # computed in the cache's dtype, returned in low
            q, k, v = _autocast.cast(k_cache.dtype, q, k, v)
            out = attention_with_kvcache(
                q, k_cache, v_cache, cache_seqlens, k=k, v=v, causal=causal,
                softmax_scale=softmax_scale, backend=backend,
            )  # fmt: skip
            return out.to(low)
    call = KVCacheCall.checked(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale)
    chosen = backends.choose(OP, call, BACKENDS, backend)
    native = _NATIVE_RUNS.get(chosen)
    if native is not None:
        return native(call)
    return run(call, chosen)


_NATIVE_RUNS = backends.native_runs(BACKENDS)
