"""fastlm.attention_varlen: packed sequences (lengths 0 and 1 included) vs the reference."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.reference import attention as ref
from tests.ops.test_attention import check_against_reference, grads
from tests.parity import assert_parity

# (q lengths, k lengths, H, Hkv, D, causal); the k lengths differ from the q lengths in
# most cases (cross-attention style and bottom-right causal over Sq != Sk).
CASES = [
    ([1], [1], 1, 1, 32, False),
    ([5, 1, 17], [5, 1, 17], 4, 2, 64, True),
    ([17, 0, 40, 1], [3, 30, 40, 9], 4, 1, 80, True),
    ([33, 2], [65, 17], 4, 4, 128, False),
    ([1, 1, 1], [40, 1, 7], 2, 1, 32, True),
]


def _id(c):
    lq, lk, h, hkv, d, causal = c
    return f"q{lq}-k{lk}-h{h}:{hkv}-d{d}" + ("-causal" if causal else "")


def cu(lengths, device):
    return torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


def packed(lq, lk, h, hkv, d, dtype, device):
    q = torch.randn(sum(lq), h, d, device=device).to(dtype)
    k = torch.randn(sum(lk), hkv, d, device=device).to(dtype)
    v = torch.randn(sum(lk), hkv, d, device=device).to(dtype)
    return q, k, v, cu(lq, device), cu(lk, device)


def run_case(case, dtype, device, backend):
    lq, lk, h, hkv, d, causal = case
    q, k, v, cu_q, cu_k = packed(lq, lk, h, hkv, d, dtype, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention_varlen(
        *inputs, cu_q, cu_k, max(lq), max(lk), causal=causal, backend=backend
    )
    assert out.shape == q.shape and out.is_contiguous()
    dout = torch.randn_like(out)
    check_against_reference(
        out, grads(out, inputs, dout), inputs, dout,
        lambda q, k, v, upcast: ref.attention_varlen(q, k, v, cu_q, cu_k, causal, upcast=upcast),
    )  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_triton_parity(case, dtype, device):
    run_case(case, dtype, device, "triton")


def test_torch_backend_parity(dtype, device):
    # The torch backend is the reference itself: one case checks the op plumbing.
    run_case(CASES[2], dtype, device, "torch")


def test_matches_padded_attention(device):
    # The same sequences padded to (B, S, H, D) with a key padding mask give the same rows.
    lengths, h, d = [7, 1, 12], 2, 32
    q, k, v, cu_q, _ = packed(lengths, lengths, h, h, d, torch.float32, device)
    out = fastlm.attention_varlen(q, k, v, cu_q, cu_q, 12, 12, causal=False, backend="triton")
    b, s = len(lengths), max(lengths)
    pad = [torch.zeros(b, s, h, d, device=device) for _ in range(3)]
    mask = torch.zeros(b, s, dtype=torch.bool, device=device)
    for i, (lo, hi) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist())):
        for p, t in zip(pad, (q, k, v)):
            p[i, : hi - lo] = t[lo:hi]
        mask[i, : hi - lo] = True
    padded = fastlm.attention(*pad, key_padding_mask=mask, backend="triton")
    rows = torch.cat([padded[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(out, rows)


def test_strided_packed_qkv(device):
    # q, k, v as views of a fused (total, 3, H, D) projection.
    lengths, h, d = [9, 4], 2, 32
    qkv = torch.randn(sum(lengths), 3, h, d, device=device)
    q, k, v = qkv.unbind(1)
    cu_q = cu(lengths, device)
    out = fastlm.attention_varlen(q, k, v, cu_q, cu_q, 9, 9, causal=True, backend="triton")
    oracle = ref.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_q, True)
    assert_parity(out, oracle, name="out")


# ------------------------------------------------------------------ bad input


def _args(device):
    q, k, v, cu_q, cu_k = packed([3, 4], [5, 2], 2, 1, 16, torch.float32, device)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=5)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(cu_seqlens_q=[0, 3, 7]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens_q must be int32, got int64"),
        (dict(cu_seqlens_k=torch.tensor([[0, 5, 7]], dtype=torch.int32)), ValueError, r"cu_seqlens_k must be 1-D"),
        (dict(cu_seqlens_k=torch.tensor([0], dtype=torch.int32)), ValueError, "batch \\+ 1 >= 2 entries"),
        (dict(cu_seqlens_k=torch.tensor([0, 5, 6, 7], dtype=torch.int32)), ValueError, "same length .* got 3 and 4"),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "must start at 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 5, 4, 7], dtype=torch.int32),
              cu_seqlens_k=torch.tensor([0, 2, 5, 7], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 5, 6], dtype=torch.int32)), ValueError, r"end at the number of tokens \(q 7, k 7\)"),
        (dict(max_seqlen_q=3), ValueError, "no sequence longer than max_seqlen"),
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be a non-negative int, got -1"),
        (dict(max_seqlen_q=4.0), ValueError, "max_seqlen_q must be a non-negative int"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")), ValueError, "cu_seqlens_q is on meta"),
        (dict(q=torch.randn(2, 7, 2, 16)), ValueError, "q must be 3-D"),
        (dict(k=torch.randn(7, 3, 16), v=torch.randn(7, 3, 16)), ValueError, r"query heads \(2\) must be a multiple"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    ],
)  # fmt: skip
def test_bad_inputs(change, error, message, device):
    args = _args(device)
    for key, value in change.items():
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            value = value.to(device)
        args[key] = value
    kwargs = {k: args.pop(k) for k in ("dropout_p",) if k in args}
    with pytest.raises(error, match=message):
        fastlm.attention_varlen(**args, **kwargs)


# ------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_torch_backend(device):
    lq, lk = [3, 1, 6], [4, 2, 6]
    q, k, v, cu_q, cu_k = packed(lq, lk, 4, 2, 16, torch.float32, device)

    def f(q, k, v, cu_q, cu_k):
        return fastlm.attention_varlen(q, k, v, cu_q, cu_k, 6, 6, causal=True, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = compiled(*inputs, cu_q, cu_k)
    expected = f(*inputs, cu_q, cu_k)
    torch.testing.assert_close(out, expected)
    dout = torch.randn_like(out)
    for g, e in zip(grads(out, inputs, dout), grads(expected, inputs, dout)):
        torch.testing.assert_close(g, e)
    # Under compile the cu_seqlens check is a device-side assert: it still fires.
    bad = torch.tensor([0, 3, 2, 10], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError):
        compiled(*inputs, bad, cu_k)


def test_cu_seqlens_checked_once_and_again_after_in_place_change(device):
    """Values are validated once per cu_seqlens tensor (one host sync for all layers of a
    model); an in-place edit bumps the version counter and is validated again."""
    q = torch.randn(10, 2, 32, device=device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    fastlm.attention_varlen(q, q, q, cu, cu, 6, 6, backend="torch")
    from fastlm.ops import attention as op

    assert op._validated(cu, 10, 6)
    with torch.no_grad():
        cu[1] = 7  # a sequence of 7 > max_seqlen 6
    assert not op._validated(cu, 10, 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        fastlm.attention_varlen(q, q, q, cu, cu, 6, 6, backend="torch")
