"""The custom op behind fastlm.attention_with_kvcache for the kernel backends (triton,
cuda, reference): ``fastlm::attention_with_kvcache``, which writes the new k, v into the
caches in place (declared as mutating k_cache and v_cache) and returns the attention
output, with its fake (meta) version so torch.compile(fullgraph=True) traces it.

Inference only: there is no autograd formula (KVCacheCall.checked refuses inputs that
require grad while grad mode is on).
"""

from __future__ import annotations

import torch

from fastlm.ops import _eager
from fastlm.ops.attention_kvcache import _cuda, _reference, _torch, _triton

BACKENDS = {"triton": _triton, "cuda": _cuda, "torch": _torch, "reference": _reference}


@torch.library.custom_op("fastlm::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def attention_with_kvcache_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    backend: str,
) -> torch.Tensor:
    """q (B, Sq, H, D); caches (B, S_max, Hkv, D); cache_seqlens int32 (B,) contiguous;
    k, v (B, Sq, Hkv, D) or None -> out (B, Sq, H, D), contiguous.

    Arguments are trusted (KVCacheCall.checked validated them) except cache_seqlens'
    values: a sequence whose length is out of range gets NaN outputs and an untouched cache.
    """
    return BACKENDS[backend].forward(
        q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale
    )


@attention_with_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale, backend):
    return q.new_empty(q.shape)


def run(call, backend: str) -> torch.Tensor:
    """The result of ``call`` on a kernel backend (the caches are appended to in place):
    straight to the backend in eager mode (fastlm.ops._eager; never differentiable), else
    through the custom op."""
    if _eager.direct(call.q, call.k_cache, call.v_cache, call.k, call.v):
        return BACKENDS[backend].forward(
            call.q, call.k_cache, call.v_cache, call.cache_seqlens, call.k, call.v,
            call.causal, call.softmax_scale,
        )  # fmt: skip
    return attention_with_kvcache_op(
        call.q, call.k_cache, call.v_cache, call.cache_seqlens, call.k, call.v,
        call.causal, call.softmax_scale, backend,
    )  # fmt: skip
