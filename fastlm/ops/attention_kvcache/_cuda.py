"""KV-cache decode attention on the CUDA C++ split-KV kernel of csrc/attention_decode.cu
(through fastlm._cuda_ext). The append is the torch backend's index arithmetic (a few tiny
kernels, no host sync), so this backend does not depend on triton."""

from __future__ import annotations

import torch

from fastlm import _cuda_ext
from fastlm.ops.attention_kvcache import _torch

# The kernel's grid is (splits, head groups, batch * seqlen_q): CUDA caps gridDim.y and .z
# (MAX_GRID_YZ, csrc/fastlm_limits.h). The binding checks it too (the last line of
# defence); here it picks another backend instead of failing.
MAX_GRID_YZ = _cuda_ext.MAX_GRID_YZ


def reason(call) -> str | None:
    q = call.q
    if (r := _cuda_ext.capability_reason(q.device)) is not None:  # CUDA tensors, sm_80 or newer
        return r
    if q.dtype not in (torch.float16, torch.bfloat16):
        dtype = str(q.dtype).replace("torch.", "")
        return f"the CUDA decode kernel takes float16 or bfloat16, got {dtype}"
    if call.head_dim not in _cuda_ext.ATTENTION_HEAD_DIMS:
        return (
            f"the CUDA decode kernel supports head_dim {_cuda_ext.ATTENTION_HEAD_DIMS}, "
            f"got {call.head_dim}"
        )
    for name, t, ok in zip(
        ("q", "k_cache", "v_cache"), (q, call.k_cache, call.v_cache), call.aligned16()
    ):
        if not ok:
            return (
                f"the CUDA decode kernel needs {name} with 16-byte aligned data and strides "
                f"(multiples of {_cuda_ext.OPERAND_ALIGN_BYTES // t.element_size()} elements), got strides {tuple(t.stride())}"
            )
    bsz, sq, h, _ = q.shape
    if h > MAX_GRID_YZ or bsz * sq > MAX_GRID_YZ:
        return (
            f"the CUDA decode kernel needs heads <= {MAX_GRID_YZ} and batch * seqlen_q <= "
            f"{MAX_GRID_YZ}, got {h} and {bsz * sq}"
        )
    return _cuda_ext.unavailable_reason()


def forward(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale):
    """Append k, v (if given) in place, then attend -> out (B, Sq, H, D)."""
    seq_new = 0
    if k is not None:
        _torch.append_kv(k_cache, v_cache, cache_seqlens, k, v)
        seq_new = k.shape[1]
    s_max = k_cache.shape[1]
    if s_max == 0:
        # No key exists: every valid query gets zeros. The kernel is not launched on a
        # cache without storage (its data pointer may be null).
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    else:
        # The kernel takes the number of valid keys, the appended ones included, and
        # clamps it to [0, S_max]; the lengths it cannot judge become NaN below.
        out, _ = _cuda_ext.module().attention_decode(
            q, k_cache, v_cache, cache_seqlens + seq_new, softmax_scale, causal
        )
    return _torch.nan_where_out_of_range(out, cache_seqlens, seq_new, s_max)
