"""fastlm.attention_varlen: packed sequences (lengths 0 and 1 included) on every backend
against fastlm.reference and SDPA math (sequence by sequence) in fp64; cu_seqlens
robustness: strided offsets, stateless validation (inference_mode, writes through .data),
and the defined result (NaN) of invalid offsets that reach the kernels unchecked."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.ops.attention import AttentionCall, _op, _torch
from fastlm.reference import attention as ref
from tests.ops.test_attention import check_oracles, grads, sdpa_varlen
from tests.parity import assert_parity

BACKENDS = ["triton", "torch", "reference"]

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


def check_varlen(out, inputs, dout, cu_q, cu_k, causal):
    check_oracles(
        out, inputs, dout,
        lambda q, k, v: ref.attention_varlen(q, k, v, cu_q, cu_k, causal),
        lambda q, k, v: sdpa_varlen(q, k, v, cu_q, cu_k, causal),
    )  # fmt: skip


def run_case(case, dtype, device, backend):
    lq, lk, h, hkv, d, causal = case
    q, k, v, cu_q, cu_k = packed(lq, lk, h, hkv, d, dtype, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention_varlen(
        *inputs, cu_q, cu_k, max(lq), max(lk), causal=causal, backend=backend
    )
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    check_varlen(out, inputs, torch.randn_like(out), cu_q, cu_k, causal)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, case, dtype, device):
    run_case(case, dtype, device, backend)


@pytest.mark.parametrize("case", CASES[1:3], ids=_id)
def test_torch_sync_free_path(case, device):
    """The torch backend's CUDA / torch.compile path (scatter into a padded batch on the
    device, no host read of cu_seqlens), run directly on CPU: same oracles."""
    lq, lk, h, hkv, d, causal = case
    q, k, v, cu_q, cu_k = packed(lq, lk, h, hkv, d, torch.float32, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    call = AttentionCall.checked_varlen(
        *inputs, cu_q, cu_k, max(lq), max(lk), causal=causal, softmax_scale=None, dropout_p=0.0
    )
    out = _torch._varlen_padded(call)
    check_varlen(out, inputs, torch.randn_like(out), cu_q, cu_k, causal)


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
    oracle = sdpa_varlen(q.double(), k.double(), v.double(), cu_q, cu_q, True)
    assert_parity(out, oracle, name="out")


# ------------------------------------------------------------------ cu_seqlens robustness


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cu_seqlens(backend, device):
    """A non-contiguous cu_seqlens is read through its stride: the view
    [0, 1000, 3, 1000, 5, 1000][::2] = [0, 3, 5] (read with stride 1 it would address row
    1000, a crash) and a stride-2 view of valid offsets both match contiguous offsets."""
    q = torch.randn(5, 2, 16, device=device, requires_grad=True)
    wild = torch.tensor([0, 1000, 3, 1000, 5, 1000], dtype=torch.int32, device=device)[::2]
    spread = torch.tensor([0, 7, 3, 7, 5, 7], dtype=torch.int32, device=device)[::2]
    expected = fastlm.attention_varlen(
        q, q, q, wild.contiguous(), wild.contiguous(), 3, 3, causal=True, backend=backend
    )
    for offsets in (wild, spread):
        assert not offsets.is_contiguous()
        out = fastlm.attention_varlen(q, q, q, offsets, offsets, 3, 3, causal=True, backend=backend)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    oracle = sdpa_varlen(q.double(), q.double(), q.double(), wild, wild, True)
    assert_parity(expected, oracle, name="out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode(backend, device):
    # cu_seqlens created in inference mode (no version counter): validation is stateless.
    with torch.inference_mode():
        q = torch.randn(10, 2, 16, device=device)
        offsets = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
        out = fastlm.attention_varlen(q, q, q, offsets, offsets, 6, 6, backend=backend)
    oracle = sdpa_varlen(q.double(), q.double(), q.double(), offsets, offsets)
    assert_parity(out, oracle, name="out")


def test_values_checked_on_every_call(device):
    """No cache: a bad value written through .data (no version bump) is still caught."""
    q = torch.randn(10, 2, 16, device=device)
    offsets = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    fastlm.attention_varlen(q, q, q, offsets, offsets, 6, 6, backend="torch")
    offsets.data[1] = 2  # a sequence of 8 > max_seqlen 6
    with pytest.raises(ValueError, match="max_seqlen"):
        fastlm.attention_varlen(q, q, q, offsets, offsets, 6, 6, backend="torch")


# Offsets the kernels may receive unchecked on CUDA (total 8 tokens, max_seqlen 4).
BAD_OFFSETS = {
    "past-the-end": [0, 1000, 8],
    "negative": [-5, 2, 8],
    "decreasing": [0, 6, 2, 8],
    "short-end": [0, 3, 5],
    "longer-than-max": [0, 1, 8],
    "huge": [0, 2**31 - 1, 8],
}


@pytest.mark.parametrize("offsets", BAD_OFFSETS.values(), ids=BAD_OFFSETS.keys())
@pytest.mark.parametrize("backend", ["triton", "torch-padded"])
def test_invalid_offsets_give_nan_never_a_crash(backend, offsets, device):
    """Invalid cu_seqlens reaching the kernels (as on CUDA, where they are not checked)
    never make them touch memory outside the tensors: the output and every gradient are
    NaN, the documented result. The CPU value check is bypassed by calling the custom op
    (and the torch backend's CUDA path) directly."""
    q = torch.randn(8, 2, 16, device=device, requires_grad=True)
    bad = torch.tensor(offsets, dtype=torch.int32, device=device)
    good = [0, 4, 8] if len(offsets) == 3 else [0, 2, 4, 8]
    good = torch.tensor(good, dtype=torch.int32, device=device)
    for cu_q, cu_k in ((bad, good), (good, bad)):
        if backend == "triton":
            out, _ = _op.attention_fwd(
                q, q, q, None, cu_q, cu_k, 4, 4, True, 0.25, 0.0, None, "triton"
            )
        else:
            call = AttentionCall(q, q, q, None, cu_q, cu_k, 4, 4, True, 0.25, 0.0)
            out = _torch._varlen_padded(call)
        assert out.shape == q.shape and torch.isnan(out).all()
        (dq,) = grads(out, [q], torch.ones_like(out))
        if backend == "triton":
            assert torch.isnan(dq).all()
        else:  # autograd through torch.where: the NaN branch passes no gradient
            assert (dq == 0).all()


# ------------------------------------------------------------------ bad input


VALUE_MESSAGES = ("must start at 0", "non-decreasing", "end at the number", "no sequence longer")


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
        (dict(softmax_scale=0.0), ValueError, "softmax_scale must be positive"),
    ],
)  # fmt: skip
def test_bad_inputs(change, error, message, device):
    args = _args(device)
    for key, value in change.items():
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            value = value.to(device)
        args[key] = value
    if device.type == "cuda" and message.startswith(VALUE_MESSAGES):
        pytest.skip("values are not checked on CUDA tensors (that would be a host sync)")
    with pytest.raises(error, match=message):
        fastlm.attention_varlen(**args)


# ------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compile_fullgraph(backend, device):
    lq, lk = [3, 1, 6], [4, 2, 6]
    q, k, v, cu_q, cu_k = packed(lq, lk, 4, 2, 16, torch.float32, device)

    def f(q, k, v, cu_q, cu_k):
        return fastlm.attention_varlen(q, k, v, cu_q, cu_k, 6, 6, causal=True, backend=backend)

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
