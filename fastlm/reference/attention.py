"""Scaled dot-product attention in plain PyTorch, written for clarity: the test oracle
(next to PyTorch's own SDPA) and the ``reference`` backend. Never the serving path.

For one (batch b, head h), with queries i < Sq and keys j < Sk:

    S[i, j]  = scale * q[i] . k[j]                      scale defaults to 1/sqrt(D)
    allowed  = key_padding_mask[b, j]                   (True = attend)
               and (not causal or j <= i + Sk - Sq)     causal mask aligned bottom-right
    P        = softmax over allowed j of S              rows with no allowed key: P = 0
    O[i]     = sum_j P[i, j] * Z[i, j] / (1 - p) * v[j] Z: dropout keep-mask (or all ones)
    lse[i]   = log sum_{allowed j} exp(S[i, j])         +inf for rows with no allowed key

Layouts: q (B, Sq, H, D); k, v (B, Sk, Hkv, D) with Hkv dividing H (grouped-query
attention: query head h reads kv head h // (H // Hkv)); key_padding_mask bool (B, Sk);
dropout_mask bool (B, H, Sq, Sk), True = keep. lse is (B, H, Sq).

The +inf log-sum-exp for empty rows is the FlashAttention convention: the backward
recomputes P = exp(S - lse), which is then exactly 0 for such rows.

Varlen layouts pack the sequences of a batch back to back: q (total_q, H, D),
k/v (total_k, Hkv, D), cu_seqlens (batch + 1,) int32 prefix sums of the lengths; lse is
(H, total_q).

Computed in fp32 (fp64 for fp64 inputs); ``upcast=False`` instead computes in the input
dtype, a naive low-precision baseline for the parity rule of tests/parity.py.
"""

from __future__ import annotations

import itertools

import torch

from fastlm.ops._checks import default_softmax_scale
from fastlm.reference._util import compute_dtype


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    """``softmax_scale``, or the default 1/sqrt(head_dim) (defined in fastlm.ops._checks)."""
    return default_softmax_scale(head_dim) if softmax_scale is None else float(softmax_scale)


def allowed_mask(
    sq: int, sk: int, causal: bool, key_padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask broadcastable to (B, H, Sq, Sk), True where a query may see a key (None: all)."""
    allowed = None
    if causal:
        i = torch.arange(sq, device=device)[:, None]
        j = torch.arange(sk, device=device)[None, :]
        allowed = (j <= i + (sk - sq))[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool)[:, None, None, :]
        allowed = pad if allowed is None else allowed & pad
    return allowed


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, Hkv, D) -> (B, S, H, D) by repeating each kv head over its query group."""
    group = heads // t.shape[2]
    return t if group == 1 else t.repeat_interleave(group, dim=2)


def _masked_scores(
    q: torch.Tensor,
    kx: torch.Tensor,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    ct: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S, allowed): S = scale * q k^T (B, H, Sq, Sk) in ``ct``, -inf where ``allowed``
    (broadcastable to S) is False; allowed None when every entry is allowed. kx: k with
    its kv heads expanded to q's. Shared by the forward and the backward recompute."""
    s = torch.einsum("bihd,bjhd->bhij", q.to(ct), kx.to(ct)) * scale
    allowed = allowed_mask(q.shape[1], kx.shape[1], causal, key_padding_mask, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s, allowed


def probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    ct: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, lse): P (B, H, Sq, Sk) in ``ct``, lse (B, H, Sq) in ``ct`` (+inf on empty rows)."""
    s, allowed = _masked_scores(q, _expand_kv(k, q.shape[2]), causal, key_padding_mask, scale, ct)
    if allowed is None:
        lse = torch.logsumexp(s, dim=-1)
    else:
        empty = ~allowed.any(-1).expand(s.shape[:-1])
        # logsumexp over an all -inf row has a NaN gradient: give it a finite row, then
        # +inf so that exp(-inf - (+inf)) = 0 gives P = 0 with no NaN anywhere.
        lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1)
        lse = lse.masked_fill(empty, float("inf"))
    p = torch.exp(s - lse[..., None])
    return p, lse


def _dropout_scale(dropout_mask: torch.Tensor | None, dropout_p: float, ct: torch.dtype):
    if dropout_mask is None:
        return None
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"reference attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    return dropout_mask.to(ct) / (1.0 - dropout_p)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, Sq, H, D) in q's dtype; with ``return_lse`` also lse (B, H, Sq) fp32.

    ``dropout_mask`` (B, H, Sq, Sk) bool keep-mask; kept probabilities are scaled by
    1 / (1 - dropout_p). Differentiable (autograd through plain torch ops).
    """
    ct = compute_dtype(q.dtype) if upcast else q.dtype
    scale = default_scale(q.shape[-1], softmax_scale)
    p, lse = probabilities(q, k, causal, key_padding_mask, scale, ct)
    keep = _dropout_scale(dropout_mask, dropout_p, ct)
    if keep is not None:
        p = p * keep
    vx = _expand_kv(v, q.shape[2]).to(ct)
    out = torch.einsum("bhij,bjhd->bihd", p, vx).to(q.dtype)
    if return_lse:
        return out, lse.to(torch.promote_types(lse.dtype, torch.float32))
    return out


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit gradients (the recompute scheme the kernels use), computed in fp32.

        P  = exp(S - lse) on allowed entries,     Pd = P * Z / (1 - p)
        dV = Pd^T dO,  dPd = dO V^T,  dP = dPd * Z / (1 - p)
        delta = rowsum(dO * O) = rowsum(P * dP)
        dS = P * (dP - delta),  dQ = scale * dS K,  dK = scale * dS^T Q
    GQA: dK and dV are summed over the query heads sharing a kv head.
    Returns dq, dk, dv in the dtypes of q, k, v.
    """
    ct = compute_dtype(q.dtype)
    heads, hkv = q.shape[2], k.shape[2]
    scale = default_scale(q.shape[-1], softmax_scale)
    kx, vx = _expand_kv(k, heads).to(ct), _expand_kv(v, heads).to(ct)
    s, _ = _masked_scores(q, kx, causal, key_padding_mask, scale, ct)
    p = torch.exp(s - lse.to(ct)[..., None])
    keep = _dropout_scale(dropout_mask, dropout_p, ct)
    do = dout.to(ct)
    pd = p if keep is None else p * keep
    dv = torch.einsum("bhij,bihd->bjhd", pd, do)
    dp = torch.einsum("bihd,bjhd->bhij", do, vx)
    if keep is not None:
        dp = dp * keep
    delta = (do * out.to(ct)).sum(-1).transpose(1, 2)  # (B, H, Sq)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhij,bjhd->bihd", ds, kx) * scale
    dk = torch.einsum("bhij,bihd->bjhd", ds, q.to(ct)) * scale
    if hkv != heads:
        b, sk, _, d = dk.shape
        dk = dk.view(b, sk, hkv, heads // hkv, d).sum(3)
        dv = dv.view(b, sk, hkv, heads // hkv, d).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------ varlen


def _spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist()
    return list(itertools.pairwise(cu))


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Packed attention: each sequence b attends within itself, as ``attention`` on
    q[cu_q[b]:cu_q[b+1]][None] etc. ``dropout_mask`` is (B, H, max_seqlen_q, max_seqlen_k);
    sequence b uses its top-left (len_q, len_k) corner. Returns out (total_q, H, D) and,
    with ``return_lse``, lse (H, total_q) fp32."""
    outs, lses = [], []
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k))):
        mask = None if dropout_mask is None else dropout_mask[b : b + 1, :, : q1 - q0, : k1 - k0]
        o, lse = attention(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, None, softmax_scale,
            mask, dropout_p, upcast=upcast, return_lse=True,
        )  # fmt: skip
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_empty((0, *q.shape[1:]))
    if return_lse:
        lse = torch.cat(lses, 1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
        return out, lse
    return out


def attention_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_varlen`` sequence by sequence (see ``attention_backward``)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k))):
        mask = None if dropout_mask is None else dropout_mask[b : b + 1, :, : q1 - q0, : k1 - k0]
        g = attention_backward(
            dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
            out[None, q0:q1], lse[None, :, q0:q1], causal, None, softmax_scale, mask, dropout_p,
        )  # fmt: skip
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv
