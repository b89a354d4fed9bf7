"""fastlm.attention: Triton kernels (interpreter on CPU) and torch backend vs the reference.

Full cross product of seq x head_dim x batch x heads x mask x dtype is far beyond the
interpreter's budget, so the cases below cover it pairwise: every seq length (1, 17, 128,
257, with Sq != Sk too), head_dim (32, 64, 80, 128), batch (1, 3), head layout (1, 4,
GQA 4:2, MQA 4:1) and mask mode (none, causal, padding, both) appears, each pair of
values of two factors in at least one case, for fp32 and fp16 (bf16 on GPU only).
"""

from __future__ import annotations

import re

import pytest
import torch

import fastlm
from fastlm import backends
from fastlm.backends import BackendUnavailableError
from fastlm.ops import attention as A
from fastlm.reference import attention as ref
from tests.parity import assert_parity, max_err

# (B, Sq, Sk, H, Hkv, D, causal, padding)
CASES = [
    (1, 1, 1, 1, 1, 32, False, False),
    (3, 17, 17, 4, 4, 64, True, True),
    (1, 128, 128, 4, 2, 80, True, False),
    (3, 17, 128, 4, 1, 128, False, True),
    (1, 257, 257, 1, 1, 64, False, True),
    (3, 128, 17, 4, 2, 32, True, True),  # Sq > Sk: causal leaves early rows empty
    (3, 1, 257, 1, 1, 80, True, False),
    (1, 257, 128, 1, 1, 128, True, True),
    (3, 17, 1, 4, 1, 64, False, False),
    (1, 128, 257, 4, 4, 32, False, False),
]


def _id(c):
    b, sq, sk, h, hkv, d, causal, pad = c
    return (
        f"b{b}-q{sq}-k{sk}-h{h}:{hkv}-d{d}"
        + ("-causal" if causal else "")
        + ("-pad" if pad else "")
    )


def make_inputs(b, sq, sk, h, hkv, d, dtype, device, pad=False, scale=1.0):
    q = (torch.randn(b, sq, h, d, device=device) * scale).to(dtype)
    k = (torch.randn(b, sk, hkv, d, device=device) * scale).to(dtype)
    v = torch.randn(b, sk, hkv, d, device=device).to(dtype)
    mask = None
    if pad:
        lengths = torch.randint(1, sk + 1, (b,))
        mask = torch.arange(sk)[None, :] < lengths[:, None]
        if b > 1:
            mask[-1] = False  # one sequence with every key padded
        mask = mask.to(device)
    return q, k, v, mask


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_against_reference(
    actual_out, actual_grads, inputs, dout, ref_fn, names=("dq", "dk", "dv")
):
    """Parity of the output and every gradient: fp64 oracle on upcast inputs; fp16/bf16
    baseline = the reference computed in the low dtype (no upcast)."""
    hi = [t.detach().double().requires_grad_() for t in inputs]
    oracle = ref_fn(*hi, upcast=True)
    oracle_grads = grads(oracle, hi, dout.double())
    baseline, baseline_grads = None, [None] * len(inputs)
    if actual_out.dtype != torch.float32:
        lo = [t.detach().clone().requires_grad_() for t in inputs]
        baseline = ref_fn(*lo, upcast=False)
        baseline_grads = grads(baseline, lo, dout)
    assert_parity(actual_out, oracle, baseline, name="out")
    # dS = P * (dP - delta) cancels: with one visible key dq and dk are exactly 0 while dP
    # and delta are two D-term fp32 dot products of |dO| |V| size. Low precision may then
    # miss 0 by fp32 rounding at that magnitude, far below the rounding floor of the rule.
    cancel = None
    if actual_out.dtype != torch.float32:
        v = inputs[-1]
        cancel = (
            v.shape[-1]
            * torch.finfo(torch.float32).eps
            * dout.abs().max().item()
            * v.abs().max().item()
        )
    for name, g, o, bl in zip(names, actual_grads, oracle_grads, baseline_grads):
        assert_parity(g, o, bl, name=name, atol=cancel)


def run_case(case, dtype, device, backend):
    b, sq, sk, h, hkv, d, causal, pad = case
    q, k, v, mask = make_inputs(b, sq, sk, h, hkv, d, dtype, device, pad)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, causal=causal, key_padding_mask=mask, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    dout = torch.randn_like(out)
    check_against_reference(
        out, grads(out, inputs, dout), inputs, dout,
        lambda q, k, v, upcast: ref.attention(q, k, v, causal, mask, upcast=upcast),
    )  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_triton_parity(case, dtype, device):
    run_case(case, dtype, device, "triton")


@pytest.mark.parametrize("case", CASES[:4], ids=_id)
def test_torch_backend_parity(case, dtype, device):
    run_case(case, dtype, device, "torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_rows_are_zero_with_zero_grads(backend, device):
    # Batch 1 has every key padded; with causal and Sq > Sk the first Sq - Sk rows see nothing.
    b, sq, sk, h, d = 2, 20, 9, 2, 32
    q, k, v, _ = make_inputs(b, sq, sk, h, h, d, torch.float32, device)
    mask = torch.ones(b, sk, dtype=torch.bool, device=device)
    mask[1] = False
    mask[0, 4] = False
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, causal=True, key_padding_mask=mask, backend=backend)
    dq, dk, dv = grads(out, inputs, torch.randn_like(out))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (out[0, : sq - sk] == 0).all() and (dq[0, : sq - sk] == 0).all()
    assert out[0, sq - sk :].abs().sum() > 0
    assert (dk[0, 4] == 0).all() and (dv[0, 4] == 0).all()  # a padded key gets no gradient


@pytest.mark.parametrize("dtype_", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_large_logits(dtype_, device):
    # Scores of order 1e4 (the fp16 "scale trick" regime): the online softmax must not
    # overflow. The naive low-precision baseline overflows here, so fp16 is checked
    # against the oracle with a tolerance of one fp16 rounding of |v| (P is ~one-hot).
    b, s, h, d = 1, 40, 2, 32
    q, k, v, _ = make_inputs(b, s, s, h, h, d, dtype_, device, scale=20.0)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, causal=True, softmax_scale=1.0, backend="triton")
    hi = [t.detach().double().requires_grad_() for t in inputs]
    oracle = ref.attention(*hi, True, None, 1.0)
    scores = torch.einsum("bihd,bjhd->bhij", hi[0], hi[1])
    assert scores.abs().max() > 5e3
    assert torch.isfinite(out).all()
    if dtype_ == torch.float32:
        # One fp32 rounding of a logit of size |S| moves exp(S - lse) by eps * |S| relative
        # (~1e-3 here): any fp32 implementation is that ill-conditioned (PyTorch's own fp32
        # autograd errs by ~3e-3 on dq). Allow 4 such roundings (dot, log2 e fold, the
        # backward's recompute of S, lse) relative to each result's magnitude.
        rel = 4 * torch.finfo(torch.float32).eps * scores.abs().max().item()
        dout = torch.randn_like(out)
        pairs = [(out, oracle), *zip(grads(out, inputs, dout), grads(oracle, hi, dout.double()))]
        for name, (g, o) in zip(("out", "dq", "dk", "dv"), pairs):
            assert torch.isfinite(g).all()
            err, bound = max_err(g, o), rel * o.abs().max().item() + 1e-5
            assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"
    else:
        assert_parity(
            out, oracle, name="out", atol=2 * torch.finfo(dtype_).eps * v.abs().max().item()
        )


@pytest.mark.parametrize("layout", ["fused_qkv", "bhsd_transposed"])
def test_strided_inputs(layout, dtype, device):
    b, s, h, d = 3, 17, 4, 32
    if layout == "fused_qkv":
        qkv = torch.randn(b, s, 3, h, d, device=device).to(dtype)
        q, k, v = qkv.unbind(2)
    else:  # Hugging Face keeps (B, H, S, D) and transposes
        q, k, v = (
            torch.randn(b, h, s, d, device=device).to(dtype).transpose(1, 2) for _ in range(3)
        )
    assert not q.is_contiguous()
    mask = torch.arange(s, device=device)[None, :] < torch.tensor([s, 5, 1], device=device)[:, None]
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, key_padding_mask=mask, causal=True, backend="triton")
    dout = torch.randn(b, h, s, d, device=device).to(dtype).transpose(1, 2)  # strided dO too
    check_against_reference(
        out, grads(out, inputs, dout), inputs, dout,
        lambda q, k, v, upcast: ref.attention(q, k, v, True, mask, upcast=upcast),
    )  # fmt: skip


def test_strided_key_padding_mask(device):
    b, s, h, d = 2, 17, 2, 32
    q, k, v, _ = make_inputs(b, s, s, h, h, d, torch.float32, device)
    wide = torch.rand(b, 2 * s, device=device) > 0.3
    mask = wide[:, ::2]
    out = fastlm.attention(q, k, v, key_padding_mask=mask, backend="triton")
    assert_parity(out, ref.attention(q.double(), k.double(), v.double(), False, mask), name="out")


def test_default_scale_and_custom_scale(device):
    q, k, v, _ = make_inputs(1, 17, 17, 2, 2, 64, torch.float32, device)
    for scale in (None, 0.3):
        out = fastlm.attention(q, k, v, softmax_scale=scale, backend="triton")
        oracle = ref.attention(q.double(), k.double(), v.double(), False, None, scale)
        assert_parity(out, oracle, name=f"out scale={scale}")


# ------------------------------------------------------------------ backend choice


def test_head_dim_limits(device):
    q, k, v, _ = make_inputs(1, 5, 5, 1, 1, 8, torch.float32, device)
    with pytest.raises(BackendUnavailableError, match="head_dim 8 is outside"):
        fastlm.attention(q, k, v, backend="triton")
    out = fastlm.attention(q, k, v, backend="torch")  # the reference has no head_dim limit
    assert_parity(out, ref.attention(q.double(), k.double(), v.double()), name="out")
    assert A.triton_head_dim_reason(256) is None and A.triton_head_dim_reason(257) is not None


def test_head_dim_256(device):
    run_case((1, 17, 17, 1, 1, 256, True, False), torch.float32, device, "triton")


# ------------------------------------------------------------------ bad input


def _ok(device, dtype=torch.float32):
    return make_inputs(2, 5, 7, 4, 2, 32, dtype, device)[:3]


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda q, k, v: (q.int(), k, v), TypeError, "q must be one of"),
        (lambda q, k, v: ([1.0], k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "k has dtype float16 but q has float32"),
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k, v[:, :3]), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q[:1], k, v), ValueError, "same batch size"),
        (
            lambda q, k, v: (q[..., :16], k[..., :16], v),
            ValueError,
            "k and v must have the same shape",
        ),
        (lambda q, k, v: (q[..., :16], k, v), ValueError, "same head_dim, got 16 and 32"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, r"query heads \(3\) must be a multiple"),
        (
            lambda q, k, v: (q[..., ::2], k[..., ::2], v[..., ::2]),
            ValueError,
            "contiguous last dimension",
        ),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k is on meta"),
    ],
)
def test_bad_tensors(mutate, error, message, device):
    q, k, v = mutate(*_ok(device))
    with pytest.raises(error, match=message):
        fastlm.attention(q, k, v)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(key_padding_mask="mask"), TypeError, "key_padding_mask must be a torch.Tensor"),
        (
            dict(key_padding_mask=torch.ones(2, 7)),
            TypeError,
            "must be a bool tensor .* got float32",
        ),
        (
            dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
            ValueError,
            r"shape \(2, 7\), got \(2, 5\)",
        ),
        (
            dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device="meta")),
            ValueError,
            "key_padding_mask is on meta",
        ),
        (dict(causal=1), TypeError, "causal must be a bool, got int"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be positive"),
        (dict(softmax_scale="a"), TypeError, "softmax_scale must be a float"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
        (dict(dropout_p=None), TypeError, "dropout_p must be a float"),
        (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
        (dict(backend="cuda"), BackendUnavailableError, "backend 'cuda' cannot serve"),
    ],
)
def test_bad_arguments(kwargs, error, message, device):
    if device.type != "cpu":
        kwargs = {
            k: (v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
            for k, v in kwargs.items()
        }
    with pytest.raises(error, match=message):
        fastlm.attention(*_ok(device), **kwargs)


# ------------------------------------------------------------------ torch.compile, opcheck


def test_compile_fullgraph_torch_backend(device):
    q, k, v, mask = make_inputs(2, 9, 11, 4, 2, 16, torch.float32, device, pad=True)

    def f(q, k, v):
        return fastlm.attention(q, k, v, causal=True, key_padding_mask=mask, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = compiled(*inputs)
    dout = torch.randn_like(out)
    expected = f(*inputs)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads(out, inputs, dout), grads(expected, inputs, dout)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, device):
    q, k, v, mask = make_inputs(2, 5, 7, 4, 2, 16, torch.float32, device, pad=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, mask, None, None, None, 5, 7, True, 0.25, 0.0, backend)
    torch.library.opcheck(A._attention_fwd, args)


# ------------------------------------------------------------------ cuda backend (CPU side)
# The CUDA kernel itself is tested on a GPU in tests/csrc/test_cuda_attention.py. Here:
# dispatch on CPU tensors, and the backward of a cuda forward, which is the Triton
# backward fed the CUDA kernel's natural lse (or the reference without Triton). The
# reference forward produces the same (out, natural lse, +inf on empty rows) contract.

CPU = torch.device("cpu")


def test_cuda_backend_on_cpu_names_why():
    why = re.escape(
        "backend 'cuda' cannot serve this call: the CUDA C++ kernels need CUDA tensors, got "
        "device 'cpu'"
    )
    q, k, v, _ = make_inputs(1, 5, 5, 2, 2, 64, torch.float16, CPU)
    with pytest.raises(BackendUnavailableError, match=why):
        fastlm.attention(q, k, v, backend="cuda")
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(BackendUnavailableError, match=why):
        fastlm.attention_varlen(q[0], k[0], v[0], cu, cu, 3, 3, backend="cuda")


def test_cuda_grid_limits():
    q = torch.empty(1, 1, 70000, 64, device="meta", dtype=torch.float16)
    k = torch.empty(1, 1, 1, 64, device="meta", dtype=torch.float16)
    limit = A.limits(A.OP, q, k, k, 1, 0.0)
    assert "batch <= 65535 and heads <= 65535, got 1 and 70000" in limit("cuda")
    assert limit("torch") is None
    assert "got 70000 and 1" in A.cuda_reason(A.OP_VARLEN, k[0], k[0], k[0], 70000, 0.0)


def test_cuda_custom_op_refuses_dropout():
    q, k, v, _ = make_inputs(1, 5, 5, 2, 2, 64, torch.float16, CPU)
    args = (None, None, None, A.draw_seed(), 5, 5, False, 0.125, 0.1, "cuda")
    with pytest.raises(NotImplementedError, match=r"no dropout, got dropout_p=0\.1"):
        A._attention_fwd(q, k, v, *args)
    with pytest.raises(NotImplementedError, match=r"no dropout, got dropout_p=0\.1"):
        A._attention_bwd(q, q, k, v, q, q[..., 0].float(), *args)


def _cuda_bwd_case(dtype, varlen):
    """Inputs, the reference forward's (out, natural lse) and the reference callable: padded
    with causal Sq > Sk and a fully padded sequence, or packed with an empty and a 1-key
    sequence, so that some rows see no key (lse = +inf)."""
    if varlen:
        lq, lk = [7, 0, 9, 3], [4, 5, 9, 1]
        q = torch.randn(sum(lq), 4, 64).to(dtype)
        k, v = (torch.randn(sum(lk), 2, 64).to(dtype) for _ in range(2))
        cu_q, cu_k = (
            torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
            for n in (lq, lk)
        )
        args = (None, cu_q, cu_k, None, max(lq), max(lk), True, 0.125, 0.0)

        def fn(q, k, v, upcast=True, return_lse=False):
            return ref.attention_varlen(
                q, k, v, cu_q, cu_k, True, 0.125, upcast=upcast, return_lse=return_lse
            )
    else:
        b, sq, sk = 2, 12, 7
        q, k, v, _ = make_inputs(b, sq, sk, 4, 2, 64, dtype, CPU)
        mask = torch.ones(b, sk, dtype=torch.bool)
        mask[1] = False
        mask[0, 2] = False
        args = (mask, None, None, None, sq, sk, True, 0.125, 0.0)

        def fn(q, k, v, upcast=True, return_lse=False):
            return ref.attention(q, k, v, True, mask, 0.125, upcast=upcast, return_lse=return_lse)

    out, lse = fn(q, k, v, return_lse=True)
    assert torch.isinf(lse).any() and (lse[torch.isinf(lse)] > 0).all()
    return (q, k, v), out, lse.float().contiguous(), args, fn


def _check_cuda_bwd(inputs, out, lse, args, fn):
    dout = torch.randn_like(out)
    dq, dk, dv = A._bwd_impl(dout, *inputs, out, lse, *args, "cuda")
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    check_against_reference(out, (dq, dk, dv), [t.requires_grad_() for t in inputs], dout, fn)
    return dq


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_cuda_backward_runs_triton_on_base2_lse(varlen, dtype, monkeypatch):
    from fastlm.kernels import attention_bwd as kbwd
    from fastlm.kernels.attention_common import LOG2E

    inputs, out, lse, args, fn = _cuda_bwd_case(dtype, varlen)
    seen = []
    real = kbwd.attention_bwd

    def spy(*a):
        seen.append(a[5])  # the lse handed to the Triton kernels
        return real(*a)

    monkeypatch.setattr(kbwd, "attention_bwd", spy)
    dq = _check_cuda_bwd(inputs, out, lse, args, fn)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], lse * LOG2E, rtol=0, atol=0)
    empty = torch.isinf(lse)  # rows that saw no key: exactly zero dq
    rows = dq.permute(1, 0, 2)[empty] if varlen else dq.permute(0, 2, 1, 3)[empty]
    assert (rows == 0).all()


def test_cuda_backward_without_triton_uses_reference(monkeypatch):
    from fastlm.kernels import attention_bwd as kbwd

    inputs, out, lse, args, fn = _cuda_bwd_case(torch.float16, varlen=False)
    real_reason = backends.device_reason

    def no_triton(backend, device):
        return (
            "triton is not importable (test)"
            if backend == "triton"
            else real_reason(backend, device)
        )

    def forbidden(*a):
        raise AssertionError("the Triton backward must not run without Triton")

    monkeypatch.setattr(backends, "device_reason", no_triton)
    monkeypatch.setattr(kbwd, "attention_bwd", forbidden)
    _check_cuda_bwd(inputs, out, lse, args, fn)


def test_cuda_reason_traces_under_compile(monkeypatch):
    # Under torch.compile the cuda limits must trace (fullgraph=True): _cuda_ext.op_reason
    # reads data_ptr(), which Dynamo cannot trace, so it must not be reached.
    from fastlm import _cuda_ext

    def untraceable(*a, **kw):
        raise AssertionError("_cuda_ext.op_reason reads data_ptr(): not under torch.compile")

    monkeypatch.setattr(_cuda_ext, "op_reason", untraceable)

    def f(q):
        reason = A.cuda_reason(A.OP, q, q, q, 1, 0.0)
        return q * (2.0 if reason is None else 3.0), reason

    q = torch.randn(1, 3, 2, 64, dtype=torch.float16)
    out, reason = torch.compile(f, fullgraph=True, backend="eager")(q)
    assert reason == "the CUDA C++ kernels need CUDA tensors, got device 'cpu'"
    torch.testing.assert_close(out, q * 3.0)
