"""fastlm.attention / fastlm.attention_varlen with backend="cuda" on a GPU: the forward of
csrc/attention_fwd.cu and the gradients through it (Triton backward on its converted lse,
or the reference backward without Triton), parity against fastlm.reference with the rule of
tests/parity.py (and SDPA math as the second oracle and the low-precision baseline); the limits that send a call elsewhere (dropout, dtype, head_dim,
alignment); invalid packed offsets (unchecked on CUDA) give NaN without touching memory
outside the tensors; torch.compile and opcheck of the custom op. Skipped without a GPU; on a
GPU the extension must build (JIT or AOT). The CPU side (dispatch, the cuda backward path through
the interpreter) is in tests/ops/test_attention.py."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm import _cuda_ext, backends, dispatch_table
from fastlm.backends import BackendUnavailableError
from fastlm.ops._checks import default_softmax_scale
from fastlm.ops.attention import BACKENDS, OP, AttentionCall, _op
from tests.ops.test_attention import _id as case_id
from tests.ops.test_attention import check_padded, grads, make_inputs
from tests.ops.test_attention_varlen import check_varlen, packed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
LOWP = [torch.float16, torch.bfloat16]
DEV = torch.device("cuda")


def _ids(d):
    return str(d).replace("torch.", "")


@pytest.fixture(scope="module")
def ext():
    reason = _cuda_ext.unavailable_reason()
    assert reason is None, f"the CUDA extension did not load on a GPU machine: {reason}"
    return _cuda_ext.module()


# (B, Sq, Sk, H, Hkv, D, causal, padding): odd lengths, Sq != Sk both ways (causal leaves
# early rows empty when Sq > Sk), MHA/GQA/MQA, lengths across several 64/128 tiles.
CASES = [
    (1, 1, 1, 1, 1, 64, False, False),
    (3, 17, 17, 4, 4, 64, True, True),
    (1, 128, 128, 4, 2, 128, True, False),
    (3, 17, 257, 4, 1, 128, False, True),
    (1, 257, 257, 2, 2, 64, False, True),
    (3, 127, 17, 4, 2, 64, True, True),
    (2, 1, 257, 2, 1, 128, True, False),
    (1, 300, 1000, 4, 4, 64, True, False),
]


@pytest.mark.parametrize("dtype", LOWP, ids=_ids)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention_parity(ext, case, dtype):
    b, sq, sk, h, hkv, d, causal, pad = case
    q, k, v, mask = make_inputs(b, sq, sk, h, hkv, d, dtype, DEV, pad)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, causal=causal, key_padding_mask=mask, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    # The forward is the CUDA kernel's, bit for bit.
    scale = default_softmax_scale(d)
    direct, _ = ext.attention(q.detach(), k.detach(), v.detach(), mask, scale, causal)
    assert torch.equal(out, direct)
    check_padded(out, inputs, torch.randn_like(out), causal, mask)


VARLEN_CASES = [
    ([1, 17, 130, 0], [5, 17, 129, 3], 4, 1, 64, True),
    ([33, 2, 1], [65, 17, 1], 4, 4, 128, False),
    ([127, 0, 64], [1, 9, 300], 4, 2, 64, True),
]


@pytest.mark.parametrize("dtype", LOWP, ids=_ids)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"q{c[0]}-k{c[1]}-d{c[4]}")
def test_attention_varlen_parity(ext, case, dtype):
    lq, lk, h, hkv, d, causal = case
    q, k, v, cu_q, cu_k = packed(lq, lk, h, hkv, d, dtype, DEV)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention_varlen(
        *inputs, cu_q, cu_k, max(lq), max(lk), causal=causal, backend="cuda"
    )
    direct, _ = ext.attention_varlen(
        q.detach(), k.detach(), v.detach(), cu_q, cu_k, max(lq), max(lk),
        default_softmax_scale(d), causal,
    )  # fmt: skip
    assert torch.equal(out, direct)
    check_varlen(out, inputs, torch.randn_like(out), cu_q, cu_k, causal)


@pytest.mark.parametrize(
    "offsets", [[0, 1000, 8], [-5, 2, 8], [0, 6, 2, 8], [0, 3, 5], [0, 1, 8]], ids=str
)
def test_varlen_invalid_offsets_give_nan(ext, offsets):
    # Unchecked on CUDA (no host sync): the offsets are clamped before the kernel reads
    # them and the output is NaN, the documented result; never an illegal memory access.
    q = torch.randn(8, 2, 64, device=DEV, dtype=torch.float16)
    bad = torch.tensor(offsets, dtype=torch.int32, device=DEV)
    good = torch.tensor([0, 4, 8] if len(offsets) == 3 else [0, 2, 4, 8], device=DEV).int()
    for cu_q, cu_k in ((bad, good), (good, bad)):
        out = fastlm.attention_varlen(q, q, q, cu_q, cu_k, 4, 4, backend="cuda")
        assert torch.isnan(out).all()
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", LOWP, ids=_ids)
def test_empty_rows_are_zero_with_zero_grads(ext, dtype):
    # Batch 1 has every key padded; with causal and Sq > Sk the first Sq - Sk rows see nothing.
    b, sq, sk, h, d = 2, 20, 9, 2, 64
    q, k, v, _ = make_inputs(b, sq, sk, h, h, d, dtype, DEV)
    mask = torch.ones(b, sk, dtype=torch.bool, device=DEV)
    mask[1] = False
    mask[0, 4] = False
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, causal=True, key_padding_mask=mask, backend="cuda")
    dq, dk, dv = grads(out, inputs, torch.randn_like(out))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (out[0, : sq - sk] == 0).all() and (dq[0, : sq - sk] == 0).all()
    assert out[0, sq - sk :].abs().sum() > 0
    assert (dk[0, 4] == 0).all() and (dv[0, 4] == 0).all()  # a padded key gets no gradient


@pytest.mark.parametrize("layout", ["fused_qkv", "bhsd_transposed"])
def test_strided_inputs_and_mask(ext, layout):
    b, s, h, d, dtype = 3, 65, 4, 64, torch.float16
    if layout == "fused_qkv":
        q, k, v = torch.randn(b, s, 3, h, d, device=DEV, dtype=dtype).unbind(2)
    else:
        q, k, v = (
            torch.randn(b, h, s, d, device=DEV, dtype=dtype).transpose(1, 2) for _ in range(3)
        )
    assert not q.is_contiguous()
    mask = (torch.rand(b, 2 * s, device=DEV) > 0.3)[:, ::2]  # strided key_padding_mask
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, key_padding_mask=mask, causal=True, backend="cuda")
    dout = torch.randn(b, h, s, d, device=DEV, dtype=dtype).transpose(1, 2)  # strided dO
    check_padded(out, inputs, dout, True, mask)


def test_backward_without_triton_uses_reference(ext, monkeypatch):
    from fastlm.kernels import attention_bwd as kbwd

    real_reason = backends.device_reason

    def no_triton(backend, device):
        if backend == "triton":
            return "triton is not importable (test)"
        return real_reason(backend, device)

    def forbidden(*a):
        raise AssertionError("the Triton backward must not run without Triton")

    monkeypatch.setattr(backends, "device_reason", no_triton)
    monkeypatch.setattr(kbwd, "attention_bwd", forbidden)
    q, k, v, mask = make_inputs(3, 33, 40, 4, 2, 128, torch.bfloat16, DEV, pad=True)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, causal=True, key_padding_mask=mask, backend="cuda")
    check_padded(out, inputs, torch.randn_like(out), True, mask)


# ------------------------------------------------------------------ limits and dispatch


@pytest.mark.parametrize(
    "dtype, d, dropout_p, message",
    [
        (torch.float16, 64, 0.1, "no dropout, got dropout_p=0.1"),
        (torch.float32, 64, 0.0, "take float16 or bfloat16, got float32"),
        (torch.float16, 32, 0.0, r"head_dim \(64, 128\), got 32"),
    ],
)
def test_explicit_cuda_out_of_limits_raises(ext, dtype, d, dropout_p, message):
    q, k, v, _ = make_inputs(2, 9, 9, 2, 2, d, dtype, DEV)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve.*" + message):
        fastlm.attention(q, k, v, dropout_p=dropout_p, backend="cuda")


def test_explicit_cuda_misaligned_raises(ext):
    base = torch.randn(2, 9, 2, 72, device=DEV, dtype=torch.float16)
    q = base[..., 1:65]  # contiguous last dim, data 2 bytes past a 16-byte boundary
    with pytest.raises(BackendUnavailableError, match="q needs 16-byte aligned"):
        fastlm.attention(q, q, q, backend="cuda")


def test_automatic_choice_falls_back_for_dropout(ext, monkeypatch):
    # Put cuda first, as a dispatch table measuring it faster would.
    monkeypatch.setattr(dispatch_table, "preferred_order", lambda op: ("cuda", "triton", "torch"))
    q, k, v, _ = make_inputs(2, 9, 9, 2, 2, 64, torch.float16, DEV)
    for p, chosen in ((0.0, "cuda"), (0.1, "triton")):
        call = AttentionCall.checked(
            q, k, v, causal=False, key_padding_mask=None, softmax_scale=None, dropout_p=p
        )
        assert backends.choose(OP, call, BACKENDS) == chosen
    out = fastlm.attention(q, k, v, dropout_p=0.1)  # runs on triton, with dropout
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, fastlm.attention(q, k, v, backend="cuda"))


# ------------------------------------------------------------------ torch.compile, opcheck


def test_compile_fullgraph(ext):
    q, k, v, mask = make_inputs(2, 33, 40, 4, 2, 64, torch.float16, DEV, pad=True)

    def f(q, k, v):
        return fastlm.attention(q, k, v, causal=True, key_padding_mask=mask, backend="cuda")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = compiled(*inputs)
    expected = f(*inputs)
    dout = torch.randn_like(out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for g, e in zip(grads(out, inputs, dout), grads(expected, inputs, dout)):
        torch.testing.assert_close(g, e)


def test_opcheck(ext):
    q, k, v, mask = make_inputs(2, 5, 7, 4, 2, 64, torch.float16, DEV, pad=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, mask, None, None, 5, 7, True, 0.125, 0.0, None, "cuda")
    torch.library.opcheck(_op.attention_fwd, args)
