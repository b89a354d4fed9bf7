"""fastlm.attention and fastlm.attention_varlen: fused scaled dot-product attention.

    attention(q, k, v)         q (B, Sq, H, D), k/v (B, Sk, Hkv, D)      -> (B, Sq, H, D)
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
                               q (total_q, H, D), k/v (total_k, Hkv, D)  -> (total_q, H, D)

Math in fastlm.reference.attention. Causal masks align bottom-right (query i sees keys
j <= i + Sk - Sq); key_padding_mask is bool (B, Sk), True = attend; grouped-query
attention when Hkv divides H. Rows with no key to attend to give zeros and zero gradients.

Dropout (dropout_p > 0) happens inside the kernel with a counter-based RNG: the keep-mask
of element (b, h, i, j) is a pure function of a seed drawn from torch's default CPU
generator and of the offset ((b * H + h) * Sq + i) * Sk + j, so the backward regenerates
it and a fixed torch.manual_seed reproduces it. ``dropout_mask`` materialises it for
tests. The torch backend draws its mask with torch.rand from the same seed: the masks of
the two backends differ, each is reproducible.

Backends: ``triton`` (fastlm.kernels.attention_fwd/_bwd), ``torch`` (fastlm.reference) and
``cuda``: the forward runs the FlashAttention-2 kernel of csrc/attention_fwd.cu (through
fastlm._cuda_ext; fp16/bf16, head_dim 64/128, no dropout, 16-byte aligned operands), which
has no backward. The backward of a cuda forward runs the Triton backward kernels: they need
only q, k, v, out and the row log-sum-exp, and the CUDA kernel's natural-log lse converts
exactly in meaning (lse2 = lse * log2 e; +inf stays +inf, so rows that saw no key recompute
P = 2^(-inf) = 0 and get zero gradients, never NaN). The conversion adds one fp32 rounding
(relative 6e-8 of |lse2|), far below the fp16/bf16 rounding of the gradients the kernel
returns; the torch backend's backward consumes a natural lse the same way. Where the
Triton kernels cannot run on the device (triton not importable) the backward of a cuda
forward is the torch reference backward on the natural lse.

The validation helpers below (check_qkv, check_head_dim, check_gqa, ...) are shared with
fastlm.ops.attention_kvcache.
"""

from __future__ import annotations

import weakref

import torch

from fastlm import backends
from fastlm.ops import _checks as C
from fastlm.reference import attention as ref

OP = "attention"
OP_VARLEN = "attention_varlen"
TRITON_MIN_HEAD_DIM = 16
TRITON_MAX_HEAD_DIM = 256
CUDA_MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z
_SEED_BOUND = 2**62


# ------------------------------------------------------------------ validation helpers


def check_gqa(op: str, heads: int, kv_heads: int) -> None:
    """Query heads must be a multiple of the kv heads (MHA, GQA, MQA)."""
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"fastlm.{op}: the number of query heads ({heads}) must be a multiple of the number "
            f"of key/value heads ({kv_heads})"
        )


def check_head_dim(op: str, head_dim: int) -> None:
    """Any backend: a non-empty head dim (kernel limits are backend limits, see limits())."""
    if head_dim < 1:
        raise ValueError(f"fastlm.{op}: head_dim must be at least 1, got {head_dim}")


def triton_head_dim_reason(head_dim: int) -> str | None:
    if not TRITON_MIN_HEAD_DIM <= head_dim <= TRITON_MAX_HEAD_DIM:
        return (
            f"head_dim {head_dim} is outside the Triton kernels' range "
            f"{TRITON_MIN_HEAD_DIM}..{TRITON_MAX_HEAD_DIM}"
        )
    return None


def cuda_reason(
    op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, dropout_p: float
) -> str | None:
    """Why csrc/attention_fwd.cu cannot serve this call (None: it can).

    dtype, head_dim, dropout and alignment come from fastlm._cuda_ext.op_reason (which also
    says whether the extension loads). The grid limits are the kernel's (grid.y = heads,
    grid.z = batch); its binding checks them too, but with a TORCH_CHECK that would make
    an automatic choice fail instead of falling back.
    """
    heads = q.shape[-2]
    if batch > CUDA_MAX_GRID_YZ or heads > CUDA_MAX_GRID_YZ:
        return (
            f"the CUDA attention kernel needs batch <= {CUDA_MAX_GRID_YZ} and heads <= "
            f"{CUDA_MAX_GRID_YZ}, got {batch} and {heads}"
        )
    from fastlm import _cuda_ext

    if torch.compiler.is_compiling():
        return _traceable_cuda_reason(q, k, v, dropout_p, _cuda_ext)
    return _cuda_ext.op_reason(op, q=q, k=k, v=v, dropout_p=dropout_p)


def _traceable_cuda_reason(q, k, v, dropout_p, ext) -> str | None:
    """The limits of _cuda_ext.supports that Dynamo can trace. Its data_ptr() alignment
    check cannot be traced (a graph break, an error under fullgraph=True), and the address
    of a graph input is not fixed at trace time anyway: here only strides are checked, and
    the binding checks the data's 16-byte alignment at run time (a RuntimeError, never a
    launch on misaligned data)."""
    if q.device.type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors, got device {q.device.type!r}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA attention kernels take float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in ext.ATTENTION_HEAD_DIMS:
        return f"the CUDA attention kernels support head_dim {ext.ATTENTION_HEAD_DIMS}, got {q.shape[-1]}"
    if dropout_p:
        return f"the CUDA attention kernels have no dropout, got dropout_p={dropout_p}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if any(st % 8 != 0 and n != 1 for st, n in zip(t.stride()[:-1], t.shape[:-1])):
            return f"{name} needs strides that are multiples of 8 elements, got {tuple(t.stride())}"
    return ext.unavailable_reason()


def limits(
    op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, dropout_p: float
):
    """Per-backend reason this call cannot be served (for backends.choose)."""

    def limit(backend: str) -> str | None:
        if backend == "triton":
            return triton_head_dim_reason(q.shape[-1])
        if backend == "cuda":
            return cuda_reason(op, q, k, v, batch, dropout_p)
        return None

    return limit


def check_qkv(op: str, q: object, k: object, v: object, ndim: int, layout: str) -> None:
    """Type, dtype, device, rank, contiguous last dim, matching head dims, GQA divisibility.

    ``ndim``/``layout``: 4 and "(batch, seq, heads, head_dim)" for padded batches,
    3 and "(total_tokens, heads, head_dim)" for packed ones. k and v must have the same
    shape; q and k the same batch (when 4-D) and head_dim.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.check_tensor(op, name, t)
        C.check_float(op, name, t)
        C.check_dim(op, name, t, ndim, layout)
    C.check_same_dtype(op, "q", q, k=k, v=v)
    C.check_same_device(op, "q", q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.check_last_dim_contiguous(op, name, t)
    if k.shape != v.shape:
        raise ValueError(
            f"fastlm.{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if ndim == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"fastlm.{op}: q and k must have the same batch size, got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"fastlm.{op}: q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}"
        )
    check_head_dim(op, q.shape[-1])
    check_gqa(op, q.shape[-2], k.shape[-2])


def check_softmax_scale(op: str, softmax_scale: object) -> None:
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(
            f"fastlm.{op}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}"
        )
    if not (softmax_scale > 0 and softmax_scale < float("inf")):
        raise ValueError(
            f"fastlm.{op}: softmax_scale must be positive and finite, got {softmax_scale!r}"
        )


def check_dropout_p(op: str, dropout_p: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"fastlm.{op}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastlm.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")


def check_flag(op: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"fastlm.{op}: {name} must be a bool, got {type(value).__name__}")


def check_key_padding_mask(
    op: str, mask: object, batch: int, seq_k: int, device: torch.device
) -> None:
    C.check_tensor(op, "key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(
            f"fastlm.{op}: key_padding_mask must be a bool tensor (True = attend), got "
            f"{str(mask.dtype).replace('torch.', '')}"
        )
    C.check_shape(op, "key_padding_mask", mask, (batch, seq_k))
    _check_device(op, "key_padding_mask", mask, device)


def _check_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(
            f"fastlm.{op}: {name} is on {t.device} but q is on {device}; "
            "all operands must be on one device"
        )


def check_cu_seqlens(
    op: str,
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    total_q: int,
    total_k: int,
    max_seqlen_q: object,
    max_seqlen_k: object,
    device: torch.device,
) -> None:
    """Shapes and dtypes always; the values (start at 0, non-decreasing, end at the token
    count, no sequence longer than max_seqlen) as follows.

    The values live on the device, and checking them costs a host sync on CUDA. Skipping
    them is not an option: a wrong cu_seqlens or a too-small max_seqlen makes the kernel
    skip or mix tokens, a silent wrong result. So: in eager mode all conditions are reduced
    on the device into one flag and read back once (one sync, a readable ValueError);
    under torch.compile (where a read-back would break the graph) the same flag goes to
    torch._assert_async, which fails the run without a sync and keeps the graph whole.
    A cu_seqlens tensor that passed is remembered (identity and version counter), so a
    model calling every layer with the same one syncs once per forward, not once per layer.
    """
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        C.check_tensor(op, name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(
                f"fastlm.{op}: {name} must be int32, got {str(cu.dtype).replace('torch.', '')}"
            )
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(
                f"fastlm.{op}: {name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}"
            )
    _check_device(op, "cu_seqlens_q", cu_seqlens_q, device)
    _check_device(op, "cu_seqlens_k", cu_seqlens_k, device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"fastlm.{op}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"fastlm.{op}: {name} must be a non-negative int, got {m!r}")

    def bad(cu: torch.Tensor, total: int, max_len: int) -> torch.Tensor:
        lens = cu[1:] - cu[:-1]
        return (cu[0] != 0) | (cu[-1] != total) | (lens < 0).any() | (lens > max_len).any()

    if not torch.compiler.is_compiling() and (
        _validated(cu_seqlens_q, total_q, max_seqlen_q)
        and _validated(cu_seqlens_k, total_k, max_seqlen_k)
    ):
        return
    flag = bad(cu_seqlens_q, total_q, max_seqlen_q) | bad(cu_seqlens_k, total_k, max_seqlen_k)
    if torch.compiler.is_compiling():
        torch._assert_async(
            ~flag, f"fastlm.{op}: invalid cu_seqlens or max_seqlen (see fastlm.{op} docs)"
        )
        return
    if bool(flag):
        raise ValueError(
            f"fastlm.{op}: cu_seqlens must start at 0, be non-decreasing and end at the number of "
            f"tokens (q {total_q}, k {total_k}), with no sequence longer than max_seqlen "
            f"(q {max_seqlen_q}, k {max_seqlen_k}); got cu_seqlens_q {cu_seqlens_q.tolist()} and "
            f"cu_seqlens_k {cu_seqlens_k.tolist()}"
        )
    _remember_valid(cu_seqlens_q, total_q, max_seqlen_q)
    _remember_valid(cu_seqlens_k, total_k, max_seqlen_k)


# A model runs every layer on the same cu_seqlens: its values are checked (one host sync)
# the first time and remembered, keyed by the tensor's identity and version counter (an
# in-place change bumps the version), so later layers launch without syncing.
_VALID_CU: dict[int, tuple[weakref.ref, int, int, int]] = {}


def _validated(cu: torch.Tensor, total: int, max_len: int) -> bool:
    entry = _VALID_CU.get(id(cu))
    return entry is not None and entry[0]() is cu and entry[1:] == (cu._version, total, max_len)


def _remember_valid(cu: torch.Tensor, total: int, max_len: int) -> None:
    if len(_VALID_CU) > 256:
        _VALID_CU.clear()
    _VALID_CU[id(cu)] = (weakref.ref(cu), cu._version, total, max_len)


# ------------------------------------------------------------------ dropout


def draw_seed() -> torch.Tensor:
    """A dropout seed from torch's default CPU generator, as a 1-element int64 CPU tensor
    (a tensor, not an int, so torch.compile keeps it a graph input)."""
    return torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64)


def _seed_int(seed: torch.Tensor) -> int:
    return int(seed.item())


def torch_dropout_mask(seed: int, batch, heads, seq_q, seq_k, dropout_p, device) -> torch.Tensor:
    """The torch backend's keep-mask (B, H, Sq, Sk) bool: torch.rand on a generator seeded
    with ``seed`` (reproducible; differs from the Triton kernel's mask)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    u = torch.rand((batch, heads, seq_q, seq_k), generator=gen, device=device)
    return u >= dropout_p


def dropout_mask(
    seed: int | torch.Tensor,
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    dropout_p: float,
    device: torch.device | str,
    *,
    backend: str = "triton",
) -> torch.Tensor:
    """Debug helper: the keep-mask (B, H, Sq, Sk) bool that ``backend`` uses for ``seed``.

    For varlen calls Sq, Sk are max_seqlen_q, max_seqlen_k and sequence b uses the top-left
    corner of mask[b]. ``backend="triton"`` runs the kernels' own RNG helper.
    """
    seed = _seed_int(seed) if isinstance(seed, torch.Tensor) else int(seed)
    device = torch.device(device)
    if backend == "torch":
        return torch_dropout_mask(seed, batch, heads, seq_q, seq_k, dropout_p, device)
    if backend != "triton":
        raise ValueError(
            f"fastlm.dropout_mask: backend must be 'triton' or 'torch', got {backend!r}"
        )
    reason = backends.device_reason("triton", device)
    if reason is not None:
        raise backends.BackendUnavailableError(f"fastlm.dropout_mask: {reason}")
    from fastlm.kernels.attention_common import dropout_keep_mask

    return dropout_keep_mask(seed, batch, heads, seq_q, seq_k, dropout_p, device)


# ------------------------------------------------------------------ implementations


def _torch_mask(seed, batch, heads, max_sq, max_sk, dropout_p, device):
    if seed is None or dropout_p == 0.0:
        return None
    return torch_dropout_mask(_seed_int(seed), batch, heads, max_sq, max_sk, dropout_p, device)


def _no_cuda_dropout(dropout_p: float) -> None:
    # limits() keeps dropout away from the cuda backend; a direct call of the custom op
    # must not get attention without the dropout it asked for.
    if dropout_p:
        raise NotImplementedError(
            f"fastlm.{OP}: the CUDA attention kernel has no dropout, got dropout_p={dropout_p}"
        )


def _cuda_fwd(q, k, v, kpm, cu_q, cu_k, max_sq, max_sk, causal, scale, dropout_p):
    """(out, natural lse) from csrc/attention_fwd.cu; lse (B, H, Sq) or (H, total_q) fp32,
    +inf and out = 0 on rows that see no key (the same convention as the reference)."""
    from fastlm import _cuda_ext

    _no_cuda_dropout(dropout_p)
    ext = _cuda_ext.module()
    if cu_q is not None:
        # The binding wants contiguous offsets (a (B + 1,) int32 copy at most).
        return ext.attention_varlen(
            q, k, v, cu_q.contiguous(), cu_k.contiguous(), max_sq, max_sk, scale, causal
        )
    if kpm is not None and kpm.shape[1] > 1 and kpm.stride(1) != 1:
        # The kernel reads mask rows with unit stride; the mask is B * Sk bytes, so copying
        # a strided one costs nothing next to the attention itself.
        kpm = kpm.contiguous()
    return ext.attention(q, k, v, kpm, scale, causal)


def _fwd_impl(q, k, v, kpm, cu_q, cu_k, seed, max_sq, max_sk, causal, scale, dropout_p, backend):
    varlen = cu_q is not None
    if backend == "triton":
        from fastlm.kernels.attention_fwd import attention_fwd

        s = _seed_int(seed) if seed is not None else 0
        return attention_fwd(q, k, v, kpm, cu_q, cu_k, max_sq, max_sk, causal, scale, dropout_p, s)
    if backend == "cuda":
        return _cuda_fwd(q, k, v, kpm, cu_q, cu_k, max_sq, max_sk, causal, scale, dropout_p)
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    mask = _torch_mask(seed, batch, q.shape[-2], max_sq, max_sk, dropout_p, q.device)
    if varlen:
        out, lse = ref.attention_varlen(
            q, k, v, cu_q, cu_k, causal, scale, mask, dropout_p, return_lse=True
        )
    else:
        out, lse = ref.attention(q, k, v, causal, kpm, scale, mask, dropout_p, return_lse=True)
    return out.contiguous(), lse.float().contiguous()


def _bwd_impl(dout, q, k, v, out, lse, kpm, cu_q, cu_k, seed, max_sq, max_sk, causal, scale, dropout_p, backend):  # fmt: skip
    varlen = cu_q is not None
    if backend == "triton":
        from fastlm.kernels.attention_bwd import attention_bwd

        s = _seed_int(seed) if seed is not None else 0
        return attention_bwd(
            dout, q, k, v, out, lse, kpm, cu_q, cu_k, max_sq, max_sk, causal, scale, dropout_p, s
        )
    if backend == "cuda":
        _no_cuda_dropout(dropout_p)
        if backends.device_reason("triton", q.device) is None:
            from fastlm.kernels.attention_bwd import attention_bwd
            from fastlm.kernels.attention_common import LOG2E

            # The cuda forward saved the natural lse; the Triton kernels take lse * log2 e.
            # +inf (rows with no key) stays +inf: their P = 2^(S log2 e - inf) is exactly 0.
            return attention_bwd(
                dout, q, k, v, out, lse * LOG2E, kpm, cu_q, cu_k, max_sq, max_sk, causal, scale,
                0.0, 0,
            )  # fmt: skip
        # No Triton on this device: the reference backward, which takes the natural lse.
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    mask = _torch_mask(seed, batch, q.shape[-2], max_sq, max_sk, dropout_p, q.device)
    if varlen:
        grads = ref.attention_varlen_backward(
            dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, mask, dropout_p
        )
    else:
        grads = ref.attention_backward(dout, q, k, v, out, lse, causal, kpm, scale, mask, dropout_p)
    return tuple(g.contiguous() for g in grads)


# ------------------------------------------------------------------ custom ops


# The second output is the backend's own row statistic, consumed only by the same backend's
# backward: the natural log-sum-exp for torch and cuda (the CUDA kernel's own unit; its
# backward converts), the base-2 one (lse * log2 e) for triton, whose backward then
# recomputes P = 2^(S log2 e - lse2) without re-rounding a large lse.
# Rows with no key hold +inf in both. Padded: (B, H, Sq); packed: (H, total_q).
@torch.library.custom_op("fastlm::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    seed: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(
        q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed,
        max_seqlen_q, max_seqlen_k, causal, softmax_scale, dropout_p, backend,
    )  # fmt: skip


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    # padded: (B, H, Sq); packed: (H, total_q)
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed, max_sq, max_sk, causal, scale, p, backend):  # fmt: skip
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    return q.new_empty(q.shape), lse


@torch.library.custom_op("fastlm::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    seed: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(
        dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed,
        max_seqlen_q, max_seqlen_k, causal, softmax_scale, dropout_p, backend,
    )  # fmt: skip


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, kpm, cu_q, cu_k, seed, max_sq, max_sk, causal, scale, p, backend):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, cu_q, cu_k, seed, max_sq, max_sk, causal, scale, p, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, cu_q, cu_k, seed)
    ctx.args = (max_sq, max_sk, causal, scale, p, backend)


def _backward(ctx, dout, dlse):
    # lse is an internal output (never returned by the public API): dlse is ignored.
    q, k, v, out, lse, kpm, cu_q, cu_k, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, kpm, cu_q, cu_k, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastlm::attention_fwd", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API


def _run(op, q, k, v, kpm, cu_q, cu_k, batch, max_sq, max_sk, causal, softmax_scale, dropout_p, backend):  # fmt: skip
    """What attention() and attention_varlen() share once their layouts are checked: the
    scalar arguments, the backend choice, a dropout seed, then the op. Returns out."""
    check_flag(op, "causal", causal)
    check_softmax_scale(op, softmax_scale)
    check_dropout_p(op, dropout_p)
    scale = ref.default_scale(q.shape[-1], softmax_scale)
    chosen = backends.choose(op, q.device, backend, limits(op, q, k, v, batch, dropout_p))
    seed = draw_seed() if dropout_p > 0 else None
    out, _ = _attention_fwd(
        q, k, v, kpm, cu_q, cu_k, seed, max_sq, max_sk, causal, scale, float(dropout_p), chosen
    )
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, Sq, H, D), k/v (B, Sk, Hkv, D).

    Inputs may have any strides with a contiguous last dim (views of a fused QKV
    projection or of (B, H, S, D) tensors transposed to (B, S, H, D) work without copies).
    ``causal`` aligns bottom-right; ``key_padding_mask`` bool (B, Sk), True = attend;
    ``softmax_scale`` defaults to 1/sqrt(D); ``dropout_p`` > 0 applies dropout to the
    attention probabilities (pass 0 in eval). fp16, bf16, fp32. Returns (B, Sq, H, D)
    contiguous in q's dtype.
    """
    check_qkv(OP, q, k, v, 4, "(batch, seq, heads, head_dim)")
    if key_padding_mask is not None:
        check_key_padding_mask(OP, key_padding_mask, k.shape[0], k.shape[1], q.device)
    return _run(
        OP, q, k, v, key_padding_mask, None, None, q.shape[0], q.shape[1], k.shape[1],
        causal, softmax_scale, dropout_p, backend,
    )  # fmt: skip


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: q (total_q, H, D), k/v (total_k, Hkv, D).

    Sequence b holds tokens cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (likewise k/v) and
    attends only within itself. cu_seqlens_* are int32 (batch + 1,) on q's device;
    max_seqlen_* bound the lengths. Validation of the cu_seqlens values: see
    ``check_cu_seqlens`` (one host sync in eager mode, a device-side assert under
    torch.compile). Returns (total_q, H, D) contiguous.
    """
    check_qkv(OP_VARLEN, q, k, v, 3, "(total_tokens, heads, head_dim)")
    check_cu_seqlens(
        OP_VARLEN, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k,
        q.device,
    )  # fmt: skip
    return _run(
        OP_VARLEN, q, k, v, None, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.numel() - 1,
        max_seqlen_q, max_seqlen_k, causal, softmax_scale, dropout_p, backend,
    )  # fmt: skip
