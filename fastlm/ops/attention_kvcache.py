"""fastlm.attention_with_kvcache: attention of a few new tokens over a KV cache (decoding).

    out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k_new, v=v_new)

q (B, Sq, H, D); k_cache, v_cache (B, S_max, Hkv, D) preallocated, Hkv dividing H (GQA);
cache_seqlens (B,) int32 or a python int: tokens already in each sequence's cache. When
k, v (B, Sq, Hkv, D) are given they are written into the caches IN PLACE at rows
cache_seqlens[b] .. cache_seqlens[b] + Sq - 1 and attended to; cache_seqlens itself is
not updated (the caller advances it), as in FlashAttention's flash_attn_with_kvcache.
Causal masking is bottom-right aligned: new token i sees keys up to
cache_seqlens[b] + i. Inference only: not differentiable.

Backends: triton (fastlm.kernels.attention_decode: append kernel + split-KV decode), cuda
(csrc/attention_decode.cu through fastlm._cuda_ext; the append is plain torch indexing,
fastlm.reference.attention_kvcache.append_kv, so the cuda backend does not depend on
triton; fp16/bf16, head_dim 64/128), torch (fastlm.reference).
"""

from __future__ import annotations

import math

import torch

from fastlm import backends
from fastlm.ops import _checks as C
from fastlm.reference import attention_kvcache as ref

OP = "attention_with_kvcache"
TRITON_MAX_HEAD_DIM = (
    256  # = fastlm.kernels.attention_decode.MAX_HEAD_DIM (not imported: lazy triton)
)
CUDA_MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z


# ------------------------------------------------------------------ implementation


def _impl(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale, num_splits, backend):
    seq_extra = k.shape[1] if k is not None else 0
    if backend == "triton":
        from fastlm.kernels.attention_decode import append_kv, decode_attention

        if k is not None:
            append_kv(k_cache, v_cache, cache_seqlens, k, v)
        return decode_attention(
            q, k_cache, v_cache, cache_seqlens, seq_extra, causal, softmax_scale, num_splits
        )
    if backend == "cuda":
        from fastlm import _cuda_ext

        if k is not None:
            # Plain torch indexing (a gather, a where and an index_put per cache): a few
            # tiny kernels per step, and it leaves out-of-range sequences untouched.
            ref.append_kv(k_cache, v_cache, cache_seqlens, k, v)
        # The kernel wants the number of valid keys, the appended ones included.
        out, _ = _cuda_ext.module().attention_decode(
            q, k_cache, v_cache, cache_seqlens + seq_extra, softmax_scale, causal
        )
    elif backend == "torch":
        out = ref.attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale
        )
    else:
        raise ValueError(f"fastlm.{OP}: backend {backend!r} has no implementation of this op")
    # Same contract as the Triton kernel: a sequence whose length is out of range gets NaN,
    # never a plausible-looking answer (values are only checked on the host for CPU
    # tensors). The CUDA C++ kernel clamps the length to the cache instead, so it needs
    # this as much as the reference does.
    lens = cache_seqlens + seq_extra
    bad = (cache_seqlens < 0) | (lens > k_cache.shape[1])
    return out.masked_fill(bad.view(-1, 1, 1, 1), float("nan"))


@torch.library.custom_op("fastlm::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    num_splits: int,
    backend: str,
) -> torch.Tensor:
    """The op behind the public function; ``num_splits`` 0 = automatic (triton only)."""
    return _impl(
        q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale, num_splits, backend
    )


@_attention_with_kvcache.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale, num_splits, backend):
    return q.new_empty(q.shape).contiguous()


# ------------------------------------------------------------------ validation


def _check_seqlens(cache_seqlens, bsz, s_max, sq_new, device):
    """cache_seqlens as an int32 (B,) tensor on ``device``; values checked where that is free."""
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(
            f"fastlm.{OP}: cache_seqlens must be an int32 tensor of shape (B,) or a python int, "
            f"got {type(cache_seqlens).__name__}"
        )
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= s_max - sq_new:
            raise ValueError(
                f"fastlm.{OP}: cache_seqlens={cache_seqlens} with {sq_new} new tokens does not fit "
                f"the cache: need 0 <= cache_seqlens and cache_seqlens + {sq_new} <= S_max={s_max}"
            )
        return torch.full((bsz,), cache_seqlens, dtype=torch.int32, device=device)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(
            f"fastlm.{OP}: cache_seqlens must be int32, got {str(cache_seqlens.dtype).replace('torch.', '')}"
        )
    C.check_shape(OP, "cache_seqlens", cache_seqlens, (bsz,))
    if cache_seqlens.device != device:
        raise ValueError(
            f"fastlm.{OP}: cache_seqlens is on {cache_seqlens.device} but q is on {device}; "
            "all operands must be on one device"
        )
    # Checking values costs a device->host sync on CUDA: done for CPU tensors only. On CUDA,
    # a sequence whose length is out of range gets NaN outputs and its cache is not touched.
    if device.type == "cpu" and bsz > 0:
        ok = (cache_seqlens >= 0) & (cache_seqlens + sq_new <= s_max)
        if torch.compiler.is_compiling():
            torch._assert_async(ok.all(), f"fastlm.{OP}: cache_seqlens out of range")
        elif not bool(ok.all()):
            raise ValueError(
                f"fastlm.{OP}: every cache_seqlens[b] must satisfy 0 <= cache_seqlens[b] and "
                f"cache_seqlens[b] + {sq_new} (new tokens) <= S_max={s_max}; got "
                f"{cache_seqlens.tolist()}"
            )
    return cache_seqlens.contiguous()


def _validate(q, k_cache, v_cache, k, v, causal, softmax_scale):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        C.check_tensor(OP, name, t)
        C.check_dim(OP, name, t, 4, "(batch, seq, heads, head_dim)")
    if (k is None) != (v is None):
        raise ValueError(f"fastlm.{OP}: give both k and v to append, or neither (got only one)")
    if k is not None:
        C.check_tensor(OP, "k", k)
        C.check_tensor(OP, "v", v)
    bsz, sq, h, d = q.shape
    hkv = k_cache.shape[2]
    C.check_shape(OP, "k_cache", k_cache, (bsz, None, None, d))
    C.check_shape(OP, "v_cache", v_cache, tuple(k_cache.shape))
    if hkv == 0 or h % hkv != 0:
        raise ValueError(
            f"fastlm.{OP}: the number of kv heads ({hkv}) must divide the number of query heads "
            f"({h}); q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}"
        )
    if d == 0:
        raise ValueError(f"fastlm.{OP}: head_dim is 0 (q shape {tuple(q.shape)})")
    if k is not None:
        C.check_shape(OP, "k", k, (bsz, sq, hkv, d))
        C.check_shape(OP, "v", v, (bsz, sq, hkv, d))
    C.check_float(OP, "q", q)
    C.check_same_dtype(OP, "q", q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    C.check_same_device(OP, "q", q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None:
            C.check_last_dim_contiguous(OP, name, t)
    if not isinstance(causal, bool):
        raise TypeError(f"fastlm.{OP}: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and (
        isinstance(softmax_scale, bool)
        or not isinstance(softmax_scale, (int, float))
        or not math.isfinite(softmax_scale)
    ):
        raise ValueError(
            f"fastlm.{OP}: softmax_scale must be a finite float or None, got {softmax_scale!r}"
        )
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            if t is not None and t.requires_grad:
                raise NotImplementedError(
                    f"fastlm.{OP} is inference-only (not differentiable), but {name} requires grad; "
                    "call it under torch.no_grad() / torch.inference_mode() or pass detached tensors"
                )


def _limits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    bsz, sq, h, d = q.shape

    def limit(backend: str) -> str | None:
        if backend == "triton" and d > TRITON_MAX_HEAD_DIM:
            return f"head_dim {d} exceeds the Triton decode kernel's limit of {TRITON_MAX_HEAD_DIM}"
        if backend == "cuda":
            # Grid limits of csrc/attention_decode.cu (grid.y = heads, grid.z = B * Sq),
            # checked by its binding too; here they choose another backend instead of failing.
            if h > CUDA_MAX_GRID_YZ or bsz * sq > CUDA_MAX_GRID_YZ:
                return (
                    f"the CUDA decode kernel needs heads <= {CUDA_MAX_GRID_YZ} and "
                    f"batch * seqlen_q <= {CUDA_MAX_GRID_YZ}, got {h} and {bsz * sq}"
                )
            from fastlm import _cuda_ext

            return _cuda_ext.op_reason(OP, q=q, k=k_cache, v=v_cache)
        return None

    return limit


# ------------------------------------------------------------------ public API


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
    last dim, Hkv dividing H; cache_seqlens: int32 (B,) or int, valid tokens already in
    the cache; k, v: (B, Sq, Hkv, D) or None. Attends to cache_seqlens[b] (+ Sq when
    appending) keys; causal masks bottom-right aligned. softmax_scale defaults to
    1/sqrt(D). Returns (B, Sq, H, D) in q's dtype. fp16, bf16, fp32; the Triton kernel takes
    head_dim up to 256; the CUDA C++ kernel fp16/bf16 with head_dim 64 or 128 and 16-byte
    aligned q and caches.

    cache_seqlens is not advanced. Its values are checked on CPU; on CUDA that would need a
    host sync, so a sequence with cache_seqlens[b] < 0 or cache_seqlens[b] + Sq > S_max
    instead gets NaN outputs and its cache rows are left untouched. Not differentiable.
    """
    _validate(q, k_cache, v_cache, k, v, causal, softmax_scale)
    bsz, _, _, d = q.shape
    sq_new = k.shape[1] if k is not None else 0
    seqlens = _check_seqlens(cache_seqlens, bsz, k_cache.shape[1], sq_new, q.device)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    chosen = backends.choose(OP, q.device, backend, _limits(q, k_cache, v_cache))
    return _attention_with_kvcache(q, k_cache, v_cache, seqlens, k, v, causal, scale, 0, chosen)
