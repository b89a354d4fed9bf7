"""fastlm.attention on every backend (Triton through the interpreter on CPU, torch = SDPA,
reference) against two fp64 oracles: fastlm.reference and PyTorch's own
F.scaled_dot_product_attention (math backend) with an explicit bottom-right causal mask
built here, independently of fastlm. The low-precision baseline of the parity rule is SDPA
math in the input dtype, never fastlm's code. softmax_scale is not passed unless a test is
about it, so the oracles' own default (SDPA's 1/sqrt(D)) checks fastlm's.

The full cross product of seq x head_dim x batch x heads x mask x dtype is far beyond the
interpreter's budget, so the cases cover it pairwise: every seq length (1, 17, 127, 257,
with Sq != Sk too), head_dim (32, 64, 80, 128), batch (1, 3), head layout (1, 4, GQA 4:2,
MQA 4:1) and mask mode (none, causal, padding, both) appears, each pair of values of two
factors in at least one case, for fp32 and fp16 (bf16 on GPU only).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastlm
from fastlm import backends
from fastlm.backends import BackendUnavailableError
from fastlm.ops.attention import AttentionCall, _cuda, _op, _triton, draw_seed
from fastlm.reference import attention as ref
from tests.parity import assert_parity, max_err

BACKENDS = ["triton", "torch", "reference"]

# (B, Sq, Sk, H, Hkv, D, causal, padding)
CASES = [
    (1, 1, 1, 1, 1, 32, False, False),
    (3, 17, 17, 4, 4, 64, True, True),
    (1, 127, 127, 4, 2, 80, True, False),
    (3, 17, 127, 4, 1, 128, False, True),
    (1, 257, 257, 1, 1, 64, False, True),
    (3, 127, 17, 4, 2, 32, True, True),  # Sq > Sk: causal leaves early rows empty
    (3, 1, 257, 1, 1, 80, True, False),
    (1, 257, 127, 1, 1, 128, True, True),
    (3, 17, 1, 4, 1, 64, False, False),
    (1, 127, 257, 4, 4, 32, False, False),
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


# ------------------------------------------------------------------ the independent oracle


def sdpa(q, k, v, causal=False, key_padding_mask=None, softmax_scale=None):
    """PyTorch's SDPA (math backend) on (B, S, H, D) tensors, computed in their dtype.
    The causal mask is built here, bottom-right aligned (tril with offset Sk - Sq)."""
    sq, sk = q.shape[1], k.shape[1]
    allowed = None
    if causal:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        allowed = pad if allowed is None else allowed & pad
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
            scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2],
        )  # fmt: skip
    return out.transpose(1, 2)


def check_parity(actual_out, actual_grads, inputs, dout, oracles, baseline_fn):
    """Parity of the output and every gradient against each fp64 oracle (name -> fn of
    q, k, v); fp16/bf16 baseline = ``baseline_fn`` (PyTorch) in the input dtype."""
    baseline, baseline_grads = None, [None] * len(inputs)
    cancel = None
    if actual_out.dtype != torch.float32:
        lo = [t.detach().clone().requires_grad_() for t in inputs]
        baseline = baseline_fn(*lo)
        baseline_grads = grads(baseline, lo, dout)
        # dS = P * (dP - delta) cancels: with one visible key dq and dk are exactly 0 while
        # dP and delta are two D-term fp32 dot products of |dO| |V| size. Low precision may
        # then miss 0 by fp32 rounding at that magnitude, far below the rule's floor.
        v = inputs[-1]
        eps32 = torch.finfo(torch.float32).eps
        cancel = v.shape[-1] * eps32 * dout.abs().max().item() * v.abs().max().item()
    for oracle_name, fn in oracles.items():
        hi = [t.detach().double().requires_grad_() for t in inputs]
        oracle = fn(*hi)
        oracle_grads = grads(oracle, hi, dout.double())
        assert_parity(actual_out, oracle, baseline, name=f"out vs {oracle_name}")
        for name, g, o, bl in zip(("dq", "dk", "dv"), actual_grads, oracle_grads, baseline_grads):
            assert_parity(g, o, bl, name=f"{name} vs {oracle_name}", atol=cancel)


def check_oracles(out, inputs, dout, with_ref, with_sdpa):
    """check_parity against fastlm.reference and SDPA, SDPA also the low-precision baseline."""
    oracles = {"reference": with_ref, "SDPA": with_sdpa}
    check_parity(out, grads(out, inputs, dout), inputs, dout, oracles, with_sdpa)


def check_padded(out, inputs, dout, causal, mask, softmax_scale=None):
    check_oracles(
        out, inputs, dout,
        lambda q, k, v: ref.attention(q, k, v, causal, mask, softmax_scale),
        lambda q, k, v: sdpa(q, k, v, causal, mask, softmax_scale),
    )  # fmt: skip


def run_case(case, dtype, device, backend):
    b, sq, sk, h, hkv, d, causal, pad = case
    q, k, v, mask = make_inputs(b, sq, sk, h, hkv, d, dtype, device, pad)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, causal=causal, key_padding_mask=mask, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    check_padded(out, inputs, torch.randn_like(out), causal, mask)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, case, dtype, device):
    run_case(case, dtype, device, backend)


@pytest.mark.parametrize(
    "case",
    [(3, 17, 9, 4, 2, 16, True, True), (2, 5, 12, 4, 1, 8, True, True), (1, 9, 9, 2, 2, 16, True, False)],
    ids=_id,
)  # fmt: skip
def test_oracles_agree(case):
    """fastlm.reference and SDPA math agree in fp64 (causal Sq != Sk, padding, GQA, default
    scale): outputs and every gradient."""
    b, sq, sk, h, hkv, d, causal, pad = case
    q, k, v, mask = make_inputs(b, sq, sk, h, hkv, d, torch.float64, torch.device("cpu"), pad)
    dout = torch.randn(b, sq, h, d, dtype=torch.float64)
    results = []
    for fn in (ref.attention, sdpa):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, causal, mask)
        results.append((out, *grads(out, inputs, dout)))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale(backend, device):
    q, k, v, _ = make_inputs(1, 17, 17, 2, 2, 64, torch.float32, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = fastlm.attention(*inputs, softmax_scale=0.3, backend=backend)
    check_padded(out, inputs, torch.randn_like(out), False, None, softmax_scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
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
    oracle = sdpa(*hi, True, None, 1.0)
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


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["fused_qkv", "bhsd_transposed"])
def test_strided_inputs(layout, backend, dtype, device):
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
    out = fastlm.attention(*inputs, key_padding_mask=mask, causal=True, backend=backend)
    dout = torch.randn(b, h, s, d, device=device).to(dtype).transpose(1, 2)  # strided dO too
    check_padded(out, inputs, dout, True, mask)


def test_strided_key_padding_mask(device):
    b, s, h, d = 2, 17, 2, 32
    q, k, v, _ = make_inputs(b, s, s, h, h, d, torch.float32, device)
    mask = (torch.rand(b, 2 * s, device=device) > 0.3)[:, ::2]
    out = fastlm.attention(q, k, v, key_padding_mask=mask, backend="triton")
    assert_parity(out, sdpa(q.double(), k.double(), v.double(), False, mask), name="out")


# ------------------------------------------------------------------ backend choice


def test_head_dim_limits(device):
    q, k, v, _ = make_inputs(1, 5, 5, 1, 1, 8, torch.float32, device)
    with pytest.raises(BackendUnavailableError, match="head_dim 8 is outside"):
        fastlm.attention(q, k, v, backend="triton")
    out = fastlm.attention(q, k, v)  # the automatic choice serves it (torch on CPU)
    assert_parity(out, sdpa(q.double(), k.double(), v.double()), name="out")
    for d, ok in ((16, True), (256, True), (257, False)):
        call = AttentionCall.checked(
            *make_inputs(1, 1, 1, 1, 1, d, torch.float32, "meta")[:3],
            causal=False, key_padding_mask=None, softmax_scale=None, dropout_p=0.0,
        )  # fmt: skip
        assert (_triton.reason(call) is None) == ok


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
        (dict(softmax_scale=0.0), ValueError, "softmax_scale must be positive"),
        (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be positive and finite"),
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
    if kwargs.get("backend") == "cuda" and device.type == "cuda":
        pytest.skip("the cuda backend may serve this call on a GPU")
    with pytest.raises(error, match=message):
        fastlm.attention(*_ok(device), **kwargs)


# ------------------------------------------------------------------ torch.compile, opcheck


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compile_fullgraph(backend, device):
    q, k, v, mask = make_inputs(2, 9, 11, 4, 2, 16, torch.float32, device, pad=True)

    def f(q, k, v):
        return fastlm.attention(q, k, v, causal=True, key_padding_mask=mask, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = compiled(*inputs)
    dout = torch.randn_like(out)
    expected = f(*inputs)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads(out, inputs, dout), grads(expected, inputs, dout)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, device):
    q, k, v, mask = make_inputs(2, 5, 7, 4, 2, 16, torch.float32, device, pad=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, mask, None, None, 5, 7, True, 0.25, 0.0, None, backend)
    torch.library.opcheck(_op.attention_fwd, args)


# ------------------------------------------------------------------ cuda backend (CPU side)
# The CUDA kernel itself is tested on a GPU in tests/csrc/test_cuda_attention.py. Here:
# dispatch on CPU tensors, and the backward of a cuda forward, which is the Triton
# backward fed the CUDA kernel's natural lse (or the reference without Triton). The
# reference forward produces the same (out, natural lse, +inf on empty rows) contract.

CPU = torch.device("cpu")


def _call(q, k, v, mask=None, dropout_p=0.0, causal=False, scale=None):
    return AttentionCall.checked(
        q, k, v, causal=causal, key_padding_mask=mask, softmax_scale=scale, dropout_p=dropout_p
    )


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


@pytest.mark.parametrize(
    "shape, dtype, d, dropout_p, message",
    [
        ((1, 1, 70000), torch.float16, 64, 0.0, "batch <= 65535 and heads <= 65535, got 1 and 70000"),
        ((70000, 1, 1), torch.float16, 64, 0.0, "got 70000 and 1"),
        ((1, 1, 1), torch.float32, 64, 0.0, "take float16 or bfloat16, got float32"),
        ((1, 1, 1), torch.float16, 32, 0.0, r"head_dim \(64, 128\), got 32"),
        ((1, 1, 1), torch.float16, 64, 0.1, "no dropout, got dropout_p=0.1"),
    ],
)  # fmt: skip
def test_cuda_limits(shape, dtype, d, dropout_p, message):
    q = torch.empty(*shape, d, device="meta", dtype=dtype)
    k = torch.empty(shape[0], 1, 1, d, device="meta", dtype=dtype)
    assert re.search(message, _cuda.reason(_call(q, k, k, dropout_p=dropout_p)))


def test_alignment_traces_under_compile():
    # The cuda reason's alignment check must trace (fullgraph=True): data_ptr() cannot.
    def f(q):
        aligned = _call(q, q, q).aligned16()
        return q * (2.0 if all(aligned) else 3.0)

    q = torch.randn(1, 3, 2, 64, dtype=torch.float16)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(q), q * 2.0)
    assert _call(q[..., 1:65], q[..., 1:65], q[..., 1:65]).aligned16() == (False,) * 3


def test_cuda_custom_op_refuses_dropout():
    q, k, v, _ = make_inputs(1, 5, 5, 2, 2, 64, torch.float16, CPU)
    args = (q, k, v, None, None, None, 5, 5, False, 0.125, 0.1, draw_seed(), "cuda")
    with pytest.raises(NotImplementedError, match=r"no dropout, got dropout_p=0\.1"):
        _op.attention_fwd(*args)
    with pytest.raises(NotImplementedError, match=r"no dropout, got dropout_p=0\.1"):
        _op.attention_bwd(q, q, q[..., 0].float(), *args)


def _cuda_bwd_case(dtype, varlen):
    """A call, the reference forward's (out, natural lse) and the oracles: padded with
    causal Sq > Sk and a fully padded sequence, or packed with an empty and a 1-key
    sequence, so that some rows see no key (lse = +inf)."""
    if varlen:
        lq, lk = [7, 0, 9, 3], [4, 5, 9, 1]
        q = torch.randn(sum(lq), 4, 64).to(dtype)
        k, v = (torch.randn(sum(lk), 2, 64).to(dtype) for _ in range(2))
        cu_q, cu_k = (
            torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
            for n in (lq, lk)
        )

        def make(q, k, v):
            return AttentionCall.checked_varlen(
                q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, softmax_scale=0.125,
                dropout_p=0.0,
            )  # fmt: skip

        def with_ref(q, k, v):
            return ref.attention_varlen(q, k, v, cu_q, cu_k, True, 0.125)

        def with_sdpa(q, k, v):
            return sdpa_varlen(q, k, v, cu_q, cu_k, True, 0.125)
    else:
        b, sq, sk = 2, 12, 7
        q, k, v, _ = make_inputs(b, sq, sk, 4, 2, 64, dtype, CPU)
        mask = torch.ones(b, sk, dtype=torch.bool)
        mask[1] = False
        mask[0, 2] = False

        def make(q, k, v):
            return _call(q, k, v, mask, causal=True, scale=0.125)

        def with_ref(q, k, v):
            return ref.attention(q, k, v, True, mask, 0.125)

        def with_sdpa(q, k, v):
            return sdpa(q, k, v, True, mask, 0.125)

    out, lse = _op.BACKENDS["reference"].forward(make(q, k, v), None)
    assert torch.isinf(lse).any() and (lse[torch.isinf(lse)] > 0).all()
    return make(q, k, v), out, lse, {"reference": with_ref, "SDPA": with_sdpa}, with_sdpa


def sdpa_varlen(q, k, v, cu_q, cu_k, causal=False, softmax_scale=None):
    """The SDPA oracle sequence by sequence on packed tensors."""
    spans = zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])
    outs = [
        sdpa(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, None, softmax_scale)[0]
        for q0, q1, k0, k1 in spans
    ]
    return torch.cat(outs, 0)


def _check_cuda_bwd(call, out, lse, oracles, baseline):
    dout = torch.randn_like(out)
    dq, dk, dv = _cuda.backward(call, None, dout, out, lse)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    inputs = [t.requires_grad_() for t in (call.q, call.k, call.v)]
    check_parity(out, (dq, dk, dv), inputs, dout, oracles, baseline)
    return dq


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_cuda_backward_runs_triton_on_base2_lse(varlen, dtype, monkeypatch):
    from fastlm.kernels import attention_bwd as kbwd
    from fastlm.kernels.attention_common import LOG2E

    call, out, lse, oracles, baseline = _cuda_bwd_case(dtype, varlen)
    seen = []
    real = kbwd.attention_bwd

    def spy(*a):
        seen.append(a[5])  # the lse handed to the Triton kernels
        return real(*a)

    monkeypatch.setattr(kbwd, "attention_bwd", spy)
    dq = _check_cuda_bwd(call, out, lse, oracles, baseline)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], lse * LOG2E, rtol=0, atol=0)
    empty = torch.isinf(lse)  # rows that saw no key: exactly zero dq
    rows = dq.permute(1, 0, 2)[empty] if varlen else dq.permute(0, 2, 1, 3)[empty]
    assert (rows == 0).all()


def test_cuda_backward_without_triton_uses_reference(monkeypatch):
    from fastlm.kernels import attention_bwd as kbwd

    call, out, lse, oracles, baseline = _cuda_bwd_case(torch.float16, varlen=False)
    real_reason = backends.device_reason

    def no_triton(backend, device):
        if backend == "triton":
            return "triton is not importable (test)"
        return real_reason(backend, device)

    def forbidden(*a):
        raise AssertionError("the Triton backward must not run without Triton")

    monkeypatch.setattr(backends, "device_reason", no_triton)
    monkeypatch.setattr(kbwd, "attention_bwd", forbidden)
    _check_cuda_bwd(call, out, lse, oracles, baseline)
