"""Attention by PyTorch's own F.scaled_dot_product_attention (SDPA), with PyTorch's autograd.

The fast path on CPU tensors and the fallback on CUDA: no custom op, and SDPA picks its
fastest kernel (flash / memory-efficient / cuDNN / the CPU flash kernel) for the call. It
serves every valid call; what SDPA does differently from fastlm is adapted here:

* causal with Sq != Sk: SDPA's ``is_causal`` is aligned top-left, fastlm's bottom-right
  (query i sees key j iff j <= i + Sk - Sq), so such calls pass an explicit bool mask;
  ``is_causal`` is used only where the two agree (Sq == Sk, no padding mask);
* a query row with no key to attend to (every key padded, or i + Sk - Sq < 0) returns
  zeros and zero gradients: the row is given every key (so no backend sees an all -inf row
  and produces NaN) and its output is zeroed, which also zeroes its gradients;
* NaN and inf are not confined the way the kernel backends confine them (the table in
  fastlm.ops.attention): with a boolean mask SDPA adds -inf to a hidden key's NaN score,
  and without one its CPU kernels turn a NaN query row into zeros. Matching the kernels
  costs a pass over k (about 20% of a B=8, S=128, H=12, D=64 fp32 CPU call, measured) or
  over the output (5 to 12%), on every call, for inputs that are almost always finite;
* grouped-query attention through SDPA's ``enable_gqa`` (no copies of k and v);
* dropout through SDPA's ``dropout_p`` (its mask comes from torch's generator).

Packed (varlen) calls on CPU read cu_seqlens on the host (free there) and run as a few
padded batches of sequences of similar length (``_length_groups``: fewer, larger SDPA calls
where the padding they add costs less than the calls they save). On CUDA, and under torch.compile, reading
cu_seqlens would be a host sync (or a graph break), so the sequences are scattered into a
zero-padded (B, max_seqlen, H, D) batch with index arithmetic on the device and run as one
masked SDPA call: sync-free and traceable, at the price of the padding's FLOPs. This is a
fallback only: the Triton and CUDA kernels serve packed CUDA calls without padding.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from fastlm.ops.attention._length_groups import length_groups
from fastlm.ops.attention.call import AttentionCall, cu_seqlens_invalid
from fastlm.reference.attention import allowed_mask

# run(call) gives the result with PyTorch's autograd: no custom op or backward of ours.
NATIVE = True


def reason(call: AttentionCall) -> str | None:
    return None


def run(call: AttentionCall) -> torch.Tensor:
    if not call.varlen:
        return _padded(call, call.q, call.k, call.v, call.key_padding_mask)
    if call.device.type == "cpu" and not torch.compiler.is_compiling():
        return _varlen_grouped(call)
    return _varlen_padded(call)


def _sdpa(
    call: AttentionCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA on (B, S, H, D) operands -> (B, Sq, H, D); rows with no allowed key give 0."""
    empty = None
    if allowed is not None:
        empty = ~allowed.any(-1, keepdim=True)
        if q.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(empty.any()):
            empty = None  # read for free on CPU: no empty row, so no pass over the output
        else:
            allowed = allowed | empty
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=allowed,
        dropout_p=call.dropout_p,
        is_causal=is_causal,
        scale=call.softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out.transpose(1, 2)


def _padded(call, q, k, v, key_padding_mask) -> torch.Tensor:
    sq, sk = q.shape[1], k.shape[1]
    if call.causal and sq == sk and key_padding_mask is None:
        return _sdpa(call, q, k, v, None, is_causal=True).contiguous()
    allowed = allowed_mask(sq, sk, call.causal, key_padding_mask, q.device)
    return _sdpa(call, q, k, v, allowed).contiguous()


def _varlen_grouped(call: AttentionCall) -> torch.Tensor:
    """CPU: the sequences in groups of similar length, one padded SDPA call per group."""
    cu_q, cu_k = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
    lens_q = [e - s for s, e in itertools.pairwise(cu_q)]
    lens_k = [e - s for s, e in itertools.pairwise(cu_k)]
    groups = length_groups(lens_q, lens_k)
    outs = [_group_attention(call, g, cu_q, cu_k, lens_q, lens_k) for g in groups]
    order = [b for g in groups for b in g]
    if order == list(range(len(lens_q))):  # every sequence, already in packed order
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0]
    total, heads, dv = call.q.shape[0], call.q.shape[1], call.v.shape[-1]
    result = call.q.new_zeros((total, heads, dv))  # queries of a sequence with no keys: 0
    if not outs:
        return result
    rows = torch.cat([torch.arange(cu_q[b], cu_q[b + 1]) for b in order])
    return result.index_copy(0, rows.to(call.q.device), torch.cat(outs, 0))


def _group_attention(call, group, cu_q, cu_k, lens_q, lens_k) -> torch.Tensor:
    """The group's sequences as one padded batch (n, max_q / max_k, H, D) -> their queries'
    outputs, packed in group order. Padding slots repeat a token of their own sequence (so
    every value read is a real one) and are masked as keys and dropped as queries."""
    q, k, v = call.q, call.k, call.v
    if len(group) == 1:
        (b,) = group
        return _padded(call, q[None, cu_q[b] : cu_q[b + 1]], k[None, cu_k[b] : cu_k[b + 1]],
                       v[None, cu_k[b] : cu_k[b + 1]], None)[0]  # fmt: skip
    lq = torch.tensor([lens_q[b] for b in group])
    lk = torch.tensor([lens_k[b] for b in group])
    mq, mk = int(lq.max()), int(lk.max())
    i, j = torch.arange(mq), torch.arange(mk)
    slots_q = torch.tensor([cu_q[b] for b in group])[:, None] + torch.minimum(i, lq[:, None] - 1)
    slots_k = torch.tensor([cu_k[b] for b in group])[:, None] + torch.minimum(j, lk[:, None] - 1)
    qg, kg, vg = (
        t.index_select(0, s.flatten().to(t.device)).view(*s.shape, *t.shape[1:])
        for t, s in ((q, slots_q), (k, slots_k), (v, slots_k))
    )
    if bool((lq == mq).all() and (lk == mk).all()):  # no padding: the plain batched call
        return _padded(call, qg, kg, vg, None).flatten(0, 1)
    allowed = j[None, None, :] < lk[:, None, None]  # (n, max_q, max_k)
    if call.causal:
        allowed = allowed & (j[None, None, :] <= i[None, :, None] + (lk - lq)[:, None, None])
    out = _sdpa(call, qg, kg, vg, allowed[:, None].to(q.device)).flatten(0, 1)
    rows = (torch.arange(len(group))[:, None] * mq + i[None, :])[i[None, :] < lq[:, None]]
    return out.index_select(0, rows.to(q.device))


def _positions(cu: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """For each packed token t, the row b * max_seqlen + i of its slot in the padded batch
    (sequence b, position i). Tokens outside every sequence or past max_seqlen (possible
    only with bad cu_seqlens on CUDA, where the values are not checked) get the spare row
    B * max_seqlen, so no index is ever out of range."""
    batch = cu.numel() - 1
    tok = torch.arange(total, device=cu.device, dtype=cu.dtype)
    seq = torch.searchsorted(cu[1:], tok, right=True)
    pos = tok - cu[seq.clamp(max=batch - 1)]
    valid = (seq < batch) & (pos >= 0) & (pos < max_seqlen)
    return torch.where(valid, seq * max_seqlen + pos, batch * max_seqlen)


def _to_padded(x: torch.Tensor, rows: torch.Tensor, batch: int, max_seqlen: int) -> torch.Tensor:
    """Packed (total, H, D) -> zero-padded (B, max_seqlen, H, D), differentiable."""
    padded = x.new_zeros((batch * max_seqlen + 1, *x.shape[1:])).index_copy(0, rows, x)
    return padded[:-1].view(batch, max_seqlen, *x.shape[1:])


def _varlen_padded(call: AttentionCall) -> torch.Tensor:
    """CUDA / torch.compile: scatter into a padded batch on the device, one SDPA call,
    gather back; sync-free. Bad cu_seqlens (unchecked on CUDA) give NaN everywhere."""
    b, lq, lk = call.batch, call.max_seqlen_q, call.max_seqlen_k
    total_q, total_k = call.q.shape[0], call.k.shape[0]
    rows_q = _positions(call.cu_seqlens_q, total_q, lq)
    rows_k = _positions(call.cu_seqlens_k, total_k, lk)
    q = _to_padded(call.q, rows_q, b, lq)
    k = _to_padded(call.k, rows_k, b, lk)
    v = _to_padded(call.v, rows_k, b, lk)
    len_q = (call.cu_seqlens_q[1:] - call.cu_seqlens_q[:-1])[:, None, None, None]
    len_k = (call.cu_seqlens_k[1:] - call.cu_seqlens_k[:-1])[:, None, None, None]
    i = torch.arange(lq, device=q.device)[:, None]
    j = torch.arange(lk, device=q.device)[None, :]
    allowed = j < len_k
    if call.causal:
        allowed = allowed & (j <= i + (len_k - len_q))
    out = _sdpa(call, q, k, v, allowed).reshape(b * lq, *call.q.shape[1:])
    out = F.pad(out, (0, 0, 0, 0, 0, 1))[rows_q]  # the spare row (zeros) for stray tokens
    bad = cu_seqlens_invalid(call.cu_seqlens_q, total_q, lq) | cu_seqlens_invalid(
        call.cu_seqlens_k, total_k, lk
    )
    return torch.where(bad, float("nan"), out).contiguous()
