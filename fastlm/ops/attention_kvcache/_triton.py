"""KV-cache decode attention on the Triton kernels of fastlm.kernels.attention_decode: an
append kernel, then split-KV flash-decoding (plus the split combine). Both bound every
index by the tensors' real sizes whatever cache_seqlens holds."""

from __future__ import annotations

from fastlm.kernels.limits import DECODE_MAX_HEAD_DIM, DECODE_MAX_QUERY_ROWS


def reason(call) -> str | None:
    if call.head_dim > DECODE_MAX_HEAD_DIM:
        return (
            f"head_dim {call.head_dim} exceeds the Triton decode kernel's limit of "
            f"{DECODE_MAX_HEAD_DIM}"
        )
    _, sq, h, _ = call.q.shape
    rows = sq * (h // call.k_cache.shape[2])
    if rows > DECODE_MAX_QUERY_ROWS:
        return (
            f"the Triton decode kernel takes at most {DECODE_MAX_QUERY_ROWS} query rows per kv "
            f"head (seqlen_q * heads / kv_heads), got {rows}"
        )
    return None


def forward(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale):
    """Append k, v (if given) in place, then attend -> out (B, Sq, H, D)."""
    from fastlm.kernels.attention_decode import append_kv, decode_attention

    seq_new = 0
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v)
        seq_new = k.shape[1]
    return decode_attention(q, k_cache, v_cache, cache_seqlens, seq_new, causal, softmax_scale)
