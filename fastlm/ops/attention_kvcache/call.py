"""The record of one fastlm.attention_with_kvcache call, and every check of its arguments.

Validation happens once, here, before any backend is chosen: types, dtypes, devices,
shapes, strides, flags, softmax_scale (exactly as fastlm.attention checks it) and, where
that is free, the values of cache_seqlens. Backends then only state their own limits
(``reason(call)`` in ``_<backend>.py``).

cache_seqlens values: on CPU they are read and checked here (no device to sync with); on
CUDA reading them would cost a device->host sync on every decode step, so they are not
read: every backend then gives a sequence whose length is out of range NaN outputs and
leaves its cache rows untouched (see fastlm.reference.attention_kvcache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastlm import _cuda_ext
from fastlm.ops import _checks as C

OP = "attention_with_kvcache"
_LAYOUT = "(batch, seq, heads, head_dim)"


# Not frozen: a frozen dataclass pays object.__setattr__ per field (0.65 against 0.19 us
# per record, measured); records are built once per call and never modified.
@dataclass(slots=True)
class KVCacheCall:
    """q (B, Sq, H, D); k_cache, v_cache (B, S_max, Hkv, D); cache_seqlens int32 (B,),
    contiguous; k, v (B, Sq, Hkv, D) or None; softmax_scale resolved (never None)."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    causal: bool
    softmax_scale: float
    # True when every cache_seqlens value was verified on the host (CPU tensors, where
    # reading them is free): backends may then skip the guards that give out-of-range
    # sequences NaN outputs (what CUDA calls, never read on the host, rely on).
    lengths_checked: bool = False
    # The cache_seqlens values as the checks read them on the host (eager CPU calls and
    # python ints), else None: backends may use them without a sync of their own.
    host_lengths: list[int] | None = None

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def s_max(self) -> int:
        return self.k_cache.shape[1]

    @property
    def seq_new(self) -> int:
        """Tokens appended by this call (0 without k, v)."""
        return 0 if self.k is None else self.k.shape[1]

    def aligned16(self) -> tuple[bool, bool, bool]:
        """q, k_cache, v_cache: 16-byte aligned data and strides (the CUDA kernel's loads)."""
        return tuple(
            _cuda_ext.aligned(t, address=not torch.compiler.is_compiling())
            for t in (self.q, self.k_cache, self.v_cache)
        )

    def dispatch_key(self) -> tuple:
        """What the backends' reasons read: device, dtype, head_dim, heads and batch * Sq
        (CUDA grid), query rows per kv head (Triton grid), and on CUDA the alignments."""
        bsz, sq, h, d = self.q.shape
        key = (
            self.device,
            self.q.dtype,
            d,
            h,
            bsz * sq,
            sq * (h // self.k_cache.shape[2]),  # query rows per kv head (Triton's grid)
        )
        return key + self.aligned16() if self.device.type == "cuda" else key

    @classmethod
    def checked(
        cls, q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale
    ) -> KVCacheCall:
        """Validate the public arguments (ValueError/TypeError/NotImplementedError naming
        what was expected and what was given) and build the record. The usual call (every
        decode step) is recognised in a few attribute reads (_plainly_valid) and then only
        its lengths are checked; anything else gets every check (_validate)."""
        if _plainly_valid(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale):
            seq_new = 0 if k is None else q.shape[1]
            host = _check_length_values(cache_seqlens, k_cache.shape[1], seq_new)
            seqlens = cache_seqlens.contiguous()
        else:
            seqlens, host = _validate(
                q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale
            )
        d = q.shape[-1]
        scale = C.default_softmax_scale(d) if softmax_scale is None else float(softmax_scale)
        checked = q.device.type == "cpu"  # the lengths were read (or asserted) on the host
        return cls(q, k_cache, v_cache, seqlens, k, v, causal, scale, checked, host)


_FLOAT = frozenset(C.FLOAT_DTYPES)


def _plainly_valid(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale) -> bool:
    """A cheap sufficient condition for _validate to pass, but for the values of
    cache_seqlens (checked after it): plain 4-D tensors of one supported dtype on one
    device with unit last-dim strides, the caches alike (and contiguous when appended
    to), the appended k, v (both or neither) shaped like q's rows over the kv heads,
    GQA-divisible heads, an int32 (B,) cache_seqlens tensor, a bool causal, a positive
    finite float scale or None, nothing to differentiate. The hot path of every decode
    step; False only means "check everything", never "invalid"."""
    for t in (q, k_cache, v_cache):
        if type(t) is not torch.Tensor or t.dim() != 4 or t.stride(3) != 1:
            return False
    dtype, device = q.dtype, q.device
    if dtype not in _FLOAT or k_cache.dtype != dtype or v_cache.dtype != dtype:
        return False
    bsz, sq, heads, d = q.shape
    cache_shape = k_cache.shape
    kv_heads = cache_shape[2]
    if (
        v_cache.shape != cache_shape or cache_shape[0] != bsz or cache_shape[3] != d or d < 1
        or kv_heads < 1 or heads % kv_heads or k_cache.device != device
        or v_cache.device != device
    ):  # fmt: skip
        return False
    if (k is None) != (v is None):
        return False
    if k is not None:
        # Appending writes the caches in place: a contiguous cache cannot alias itself
        # (other layouts get the full overlap check).
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return False
        for t in (k, v):
            if (
                type(t) is not torch.Tensor or t.dtype != dtype or t.dim() != 4
                or t.shape != (bsz, sq, kv_heads, d) or t.stride(3) != 1 or t.device != device
            ):  # fmt: skip
                return False
    if (
        type(cache_seqlens) is not torch.Tensor or cache_seqlens.dtype != torch.int32
        or cache_seqlens.shape != (bsz,) or cache_seqlens.device != device
    ):  # fmt: skip
        return False
    if type(causal) is not bool or not (
        softmax_scale is None or (type(softmax_scale) is float and 0 < softmax_scale < math.inf)
    ):
        return False
    return not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v)
    )


def _validate(
    q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale
) -> tuple[torch.Tensor, list[int] | None]:
    """Every check -> (cache_seqlens as a contiguous int32 (B,) tensor on q's device, its
    values where the checks read them on the host, else None)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        C.check_tensor(OP, name, t)
        C.check_dim(OP, name, t, 4, _LAYOUT)
    if (k is None) != (v is None):
        raise ValueError(f"fastlm.{OP}: give both k and v to append, or neither (got only one)")
    if k is not None:
        C.check_tensor(OP, "k", k)
        C.check_tensor(OP, "v", v)
    bsz, sq, h, d = q.shape
    C.check_head_dim(OP, d)
    C.check_shape(OP, "k_cache", k_cache, (bsz, None, None, d))
    C.check_shape(OP, "v_cache", v_cache, tuple(k_cache.shape))
    hkv = k_cache.shape[2]
    C.check_gqa(OP, h, hkv)
    if k is not None:
        C.check_shape(OP, "k", k, (bsz, sq, hkv, d))
        C.check_shape(OP, "v", v, (bsz, sq, hkv, d))
    C.check_float(OP, "q", q)
    C.check_same_dtype(OP, "q", q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    C.check_same_device(OP, "q", q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None:
            C.check_last_dim_contiguous(OP, name, t)
    if k is not None:
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            C.check_no_self_overlap(OP, name, cache, _APPEND_NEEDS)
    C.check_flag(OP, "causal", causal)
    C.check_softmax_scale(OP, softmax_scale)
    _check_inference_only(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    seq_new = 0 if k is None else sq
    return _checked_seqlens(cache_seqlens, q, k_cache.shape[1], seq_new)


_APPEND_NEEDS = (
    "appending k, v writes every sequence's new rows into it in place, so each (batch, "
    "position, kv head) row needs memory of its own (e.g. allocate it with torch.zeros or "
    "pass .clone()); a cache that is only read (no k, v) may be expanded"
)


def _check_inference_only(**tensors: torch.Tensor | None) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise NotImplementedError(
                f"fastlm.{OP} is inference-only (not differentiable), but {name} requires grad; "
                "call it under torch.no_grad() / torch.inference_mode() or pass detached tensors"
            )


def _fits(seq_new: int, s_max: int) -> str:
    return f"need 0 <= cache_seqlens and cache_seqlens + {seq_new} (new tokens) <= S_max={s_max}"


def _checked_seqlens(
    cache_seqlens: object, q: torch.Tensor, s_max: int, seq_new: int
) -> tuple[torch.Tensor, list[int] | None]:
    """cache_seqlens as a contiguous int32 (B,) tensor on q's device (the kernels read it
    with unit stride); values checked where that is free (python ints, CPU tensors) and
    then returned too."""
    bsz, device = q.shape[0], q.device
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(
            f"fastlm.{OP}: cache_seqlens must be an int32 tensor of shape (B,) or a python int, "
            f"got {type(cache_seqlens).__name__}"
        )
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= s_max - seq_new:
            raise ValueError(
                f"fastlm.{OP}: cache_seqlens={cache_seqlens} does not fit the cache: "
                + _fits(seq_new, s_max)
            )
        lengths = [cache_seqlens] * bsz
        return torch.full((bsz,), cache_seqlens, dtype=torch.int32, device=device), lengths
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(
            f"fastlm.{OP}: cache_seqlens must be int32, got "
            f"{str(cache_seqlens.dtype).replace('torch.', '')}"
        )
    C.check_shape(OP, "cache_seqlens", cache_seqlens, (bsz,))
    C.check_same_device(OP, "q", q, cache_seqlens=cache_seqlens)
    lengths = _check_length_values(cache_seqlens, s_max, seq_new)
    return cache_seqlens.contiguous(), lengths


def _check_length_values(cache_seqlens: torch.Tensor, s_max: int, seq_new: int) -> list[int] | None:
    """Every cache_seqlens[b] leaves room for the appended tokens, where reading the values
    is free: eager CPU tensors (ValueError; the values read are returned), traced CPU calls
    (a device-side assert). On other devices it is not read (see the module docstring).
    None where the values were not read on the host."""
    if cache_seqlens.device.type != "cpu":
        return None
    if not cache_seqlens.numel():
        return []
    if torch.compiler.is_compiling():
        ok = (cache_seqlens >= 0) & (cache_seqlens <= s_max - seq_new)
        torch._assert_async(ok.all(), f"fastlm.{OP}: cache_seqlens out of range")
        return None
    lengths = cache_seqlens.tolist()  # one host read, cheaper than reductions for a batch
    if not 0 <= min(lengths) <= max(lengths) <= s_max - seq_new:
        raise ValueError(
            f"fastlm.{OP}: every cache_seqlens[b] must fit the cache: "
            f"{_fits(seq_new, s_max)}; got {lengths}"
        )
    return lengths
