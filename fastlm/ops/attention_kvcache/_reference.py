"""KV-cache decode attention by fastlm.reference (fp32 internally, fp64 for fp64): the
oracle, served only when asked for by name (``backend="reference"``), for debugging a
kernel against it. Not a serving path: its append reads cache_seqlens on the host."""

from __future__ import annotations

from fastlm.reference import attention_kvcache as ref


def reason(call) -> str | None:
    return None


def forward(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale):
    """Append k, v (if given) in place, then attend -> out (B, Sq, H, D)."""
    return ref.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale
    )
