"""fastlm.linear_gelu and fastlm.gelu_ffn: the output and every gradient, on every backend.

Two oracles in fp64: fastlm.reference (autograd through it) and PyTorch's own F.linear +
F.gelu (independent of fastlm, so a bug shared by a kernel and the reference cannot hide);
the two are also checked against each other. Baseline of the parity rule: PyTorch F.linear +
F.gelu in the input dtype, never fastlm's code. Shapes stay small: under TRITON_INTERPRET
each program instance of the GEMM costs milliseconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlm
from fastlm.backends import BackendUnavailableError
from fastlm.ops.ffn import _op as op
from fastlm.reference import ffn as ref
from tests.parity import assert_parity, max_err, rounding_step

BACKENDS = ["triton", "torch", "reference"]
KERNEL_BACKENDS = ["triton", "reference"]  # the ones behind the custom ops (cuda: tests/csrc)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _weight(out_f, in_f, dtype, device, *, transposed=False):
    """(out_f, in_f) weight ~ 1/sqrt(in_f); ``transposed``: a (in_f, out_f) tensor's .t() view,
    the layout of GPT-2's Conv1D (strides (1, out_f))."""
    scale = max(in_f, 1) ** -0.5
    if transposed:
        return (torch.randn(in_f, out_f, device=device) * scale).to(dtype).t()
    return (torch.randn(out_f, in_f, device=device) * scale).to(dtype)


def _x(lead, k, dtype, device, *, strided=False, scale=1.0):
    """(*lead, k); ``strided``: a view with row stride k + 5 (not a contiguous tensor)."""
    if strided:
        return (torch.randn(*lead, k + 5, device=device) * scale).to(dtype)[..., 3 : 3 + k]
    return (torch.randn(*lead, k, device=device) * scale).to(dtype)


def _forward_backward(fn, inputs, dy):
    """Outputs and the gradient of every non-None input."""
    leaves = _leaves(*inputs)
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = (
        torch.autograd.grad(out, present, dy)
        if present and out.numel()
        else [torch.zeros_like(t) for t in present]
    )
    return out, list(grads)


def _compare(fast, oracle, torch_op, inputs, dy, names, *, atol=None):
    """Run fastlm (``fast``), the fp64 oracles (fastlm.reference = ``oracle``, PyTorch =
    ``torch_op`` in fp64) and the low-precision baseline (``torch_op`` in the input dtype) on
    ``inputs`` (low dtype tensors, None allowed); check the output and every gradient with
    the parity rule against both oracles."""
    out, grads = _forward_backward(fast, inputs, dy)
    up = [None if t is None else t.double() for t in inputs]
    o_out, o_grads = _forward_backward(oracle, up, dy.double())
    t_out, t_grads = _forward_backward(torch_op, up, dy.double())
    b_out, b_grads = _forward_backward(torch_op, inputs, dy)
    # The two oracles agree to fp64 rounding: the reference is PyTorch's math.
    torch.testing.assert_close(o_out, t_out, rtol=1e-10, atol=1e-10)
    for og, tg in zip(o_grads, t_grads):
        torch.testing.assert_close(og, tg, rtol=1e-10, atol=1e-10)
    present = [n for n, t in zip(names, inputs) if t is not None]
    # Every output and gradient here is a GEMM: its reduction runs over one of the dims.
    k = max(d for t in inputs if t is not None for d in t.reshape(-1, t.shape[-1]).shape)
    assert out.dtype == inputs[0].dtype
    assert out.shape == o_out.shape, f"output: shape {tuple(out.shape)} != {tuple(o_out.shape)}"
    for oracle_name, oo in (("", o_out), (" vs F.linear+F.gelu", t_out)):
        tol = _fp32_atol(atol, b_out, oo, k)
        assert_parity(out, oo, b_out, name="output" + oracle_name, atol=tol)
    for name, g, og, tg, bg in zip(present, grads, o_grads, t_grads, b_grads):
        assert g.shape == og.shape, f"grad {name}: shape {tuple(g.shape)} != {tuple(og.shape)}"
        assert g.dtype == bg.dtype, f"grad {name}: dtype {g.dtype} != {bg.dtype}"
        for oracle_name, oracle_g in (("", og), (" vs F.linear+F.gelu", tg)):
            tol = _fp32_atol(atol, bg, oracle_g, k)
            assert_parity(g, oracle_g, bg, name=f"grad {name}{oracle_name}", atol=tol)


def _fp32_atol(mode, baseline, oracle, reduction=1):
    """atol for fp32 results (None for fp16/bf16, which follow the low-precision rule).

    tests.parity compares fp32 results as float64 tensors, which would apply float64's
    assert_close tolerances; 1e-5 restores fp32's defaults (atol 1e-5, rtol 1.3e-6), the
    parity rule for fp32 kernels (fastlm/parity.py). mode "baseline": for large magnitudes an fp32 dot product
    loses absolute precision whoever computes it (terms of size s^2 cancel to small outputs),
    so the bound also admits twice PyTorch's own fp32 error at this scale (the FlashAttention
    rule used for fp16) plus an ulp floor: a sum of ``reduction`` fp32 terms in another order
    may differ by up to ``reduction`` rounding steps at the result's magnitude (the classic
    gamma_K bound), even where PyTorch happens to land within one or two. Without the floor a
    correct kernel failed (dW at scale 300: 6 ulp near 4700 against 2 x PyTorch's 2 ulp)."""
    if baseline.dtype != torch.float32:
        return None
    if mode == "baseline":
        mag = oracle.double().abs().max().item() if oracle.numel() else 0.0
        floor = reduction * rounding_step(torch.float32, mag)
        return 1e-5 + 2 * max_err(baseline, oracle) + floor
    return 1e-5


# ------------------------------------------------------------------ linear_gelu parity

# (leading dims, K, N, approximate, bias, layout)
LG_CASES = [
    ((3,), 40, 72, "none", True, "plain"),
    ((1,), 24, 1000, "tanh", True, "plain"),
    ((127,), 64, 100, "tanh", False, "strided-x"),
    ((2, 17), 384, 48, "none", True, "conv1d-w"),
    ((17,), 1000, 40, "none", True, "conv1d-w"),
]


def _lg_check(backend, lead, k, n, approximate, bias, layout, dtype, device, scale=1.0, atol=None):
    x = _x(lead, k, dtype, device, strided=layout == "strided-x", scale=scale)
    w = _weight(n, k, dtype, device, transposed=layout == "conv1d-w")
    b = (0.5 * torch.randn(n, device=device)).to(dtype) if bias else None
    dy = torch.randn(*lead, n, device=device).to(dtype)
    _compare(
        lambda x, w, b: fastlm.linear_gelu(x, w, b, approximate=approximate, backend=backend),
        lambda x, w, b: ref.linear_gelu(x, w, b, approximate),
        lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate),
        [x, w, b],
        dy,
        ["x", "weight", "bias"],
        atol=atol,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", LG_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}-{c[3]}-bias{c[4]}-{c[5]}"
)
def test_linear_gelu_parity(backend, case, dtype, device):
    _lg_check(backend, *case, dtype, device)


# ------------------------------------------------------------------ gelu_ffn parity

# (leading dims, H, I, H_out, approximate, bias, residual, layout)
FFN_CASES = [
    ((3,), 40, 72, 40, "none", True, True, "plain"),
    ((127,), 32, 100, 24, "tanh", False, False, "strided-x"),
    ((2, 17), 48, 384, 48, "tanh", True, True, "conv1d-w"),
    ((1,), 16, 64, 1000, "none", True, False, "plain"),
    ((17,), 384, 32, 384, "tanh", True, True, "plain"),
]


def _ffn_check(backend, lead, h, inter, h_out, approximate, bias, residual, layout, dtype, device):
    x = _x(lead, h, dtype, device, strided=layout == "strided-x")
    w1 = _weight(inter, h, dtype, device, transposed=layout == "conv1d-w")
    w2 = _weight(h_out, inter, dtype, device, transposed=layout == "conv1d-w")
    b1 = (0.5 * torch.randn(inter, device=device)).to(dtype) if bias else None
    b2 = (0.5 * torch.randn(h_out, device=device)).to(dtype) if bias else None
    r = torch.randn(*lead, h_out, device=device).to(dtype) if residual else None
    dy = torch.randn(*lead, h_out, device=device).to(dtype)

    def torch_ffn(x, w1, b1, w2, b2, r):
        out = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
        return out if r is None else out + r

    _compare(
        lambda x, w1, b1, w2, b2, r: fastlm.gelu_ffn(
            x, w1, b1, w2, b2, approximate=approximate, residual=r, backend=backend
        ),
        lambda x, w1, b1, w2, b2, r: ref.gelu_ffn(x, w1, b1, w2, b2, approximate, r),
        torch_ffn,
        [x, w1, b1, w2, b2, r],
        dy,
        ["x", "w1", "b1", "w2", "b2", "residual"],
        # fp32: two chained GEMMs (dW1 = ((dout W2) * gelu'(h1))^T x) exceed the fixed fp32
        # defaults even when PyTorch computes them (dW1 off by 2e-5 at H = 384), so the
        # bound is PyTorch's own fp32 error x2 plus the gamma_K ulp floor.
        atol="baseline",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    FFN_CASES,
    ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}->{c[3]}-{c[4]}-bias{c[5]}-res{c[6]}-{c[7]}",
)
def test_gelu_ffn_parity(backend, case, dtype, device):
    _ffn_check(backend, *case, dtype, device)


# ------------------------------------------------------------------ property test


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 48),
    n=st.integers(1, 70),
    approximate=st.sampled_from(["none", "tanh"]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 300.0]),
)
def test_linear_gelu_property(m, k, n, approximate, bias, dtype, scale):
    torch.manual_seed(m * 1000 + k * 10 + n)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _lg_check(
        "triton",
        (m,),
        k,
        n,
        approximate,
        bias,
        "plain",
        dtype,
        device,
        scale=scale,
        atol="baseline",
    )


# ------------------------------------------------------------------ pre-activation storage


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_pre_activation_stored_only_for_backward(backend, device):
    x, w, b = (
        torch.randn(5, 8, device=device),
        torch.randn(12, 8, device=device),
        torch.randn(12, device=device),
    )
    _, h = op.linear_gelu_fwd(x, w, b, "none", False, backend)
    assert h.numel() == 0
    y, h = op.linear_gelu_fwd(x, w, b, "none", True, backend)
    torch.testing.assert_close(h, ref.linear(x, w, b))
    with torch.no_grad():
        y_ng = fastlm.linear_gelu(x, w, b, backend=backend)
    torch.testing.assert_close(y_ng, y)
    # The backward without a stored h recomputes it: same gradients.
    dy = torch.randn(5, 12, device=device)
    with_h = op.linear_gelu_bwd(dy, x, w, b, h, "tanh", True, True, True, backend)
    without = op.linear_gelu_bwd(dy, x, w, b, x.new_empty((0,)), "tanh", True, True, True, backend)
    for g1, g2 in zip(with_h, without):
        torch.testing.assert_close(g1, g2)


def test_pre_activation_stored_only_when_a_backward_can_follow(monkeypatch, device):
    """The forward writes h only when grad mode is on and an input h's gradient flows to
    (x, w1, b1) requires grad; for inference and second-layer-only training it skips it."""
    seen = []
    real_kernels = op._kernels

    class Recording:
        """The backend's first-GEMM primitive, recording its store_pre argument (the one
        place both the custom op and the eager direct path go through)."""

        def __init__(self, backend):
            self.impl = real_kernels(backend)

        def linear_act(self, x, w, b, approximate, store_pre):
            seen.append(store_pre)
            return self.impl.linear_act(x, w, b, approximate, store_pre)

        def __getattr__(self, name):
            return getattr(self.impl, name)

    monkeypatch.setattr(op, "_kernels", Recording)
    x = torch.randn(3, 4, device=device)
    w1, b1 = torch.randn(6, 4, device=device), torch.randn(6, device=device)
    w2 = torch.randn(5, 6, device=device)

    def both():
        fastlm.linear_gelu(x, w1, b1, backend="reference")
        fastlm.gelu_ffn(x, w1, b1, w2, None, backend="reference")

    both()  # nothing requires grad
    w2.requires_grad_()
    both()  # only the second layer: h1 is not needed
    b1.requires_grad_()
    both()
    with torch.no_grad():
        both()
    assert seen == [False, False, False, False, True, True, False, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_ffn_grads_of_second_layer_only(backend, device):
    """Only w2/b2/residual need grads: h1 is not stored and dx/dw1/db1 are not computed."""
    x, w1, b1 = (
        torch.randn(4, 8, device=device),
        torch.randn(16, 8, device=device),
        torch.randn(16, device=device),
    )
    w2, b2 = _leaves(torch.randn(8, 16, device=device), torch.randn(8, device=device))
    r = torch.randn(4, 8, device=device, requires_grad=True)
    out = fastlm.gelu_ffn(x, w1, b1, w2, b2, residual=r, backend=backend)
    dy = torch.randn_like(out)
    gw2, gb2, gr = torch.autograd.grad(out, [w2, b2, r], dy)
    a = ref.linear_gelu(x, w1, b1)
    torch.testing.assert_close(gw2, dy.t() @ a)
    torch.testing.assert_close(gb2, dy.sum(0))
    torch.testing.assert_close(gr, dy)


# ------------------------------------------------------------------ zero sizes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lead,k,n", [((0,), 8, 12), ((2, 0), 8, 12), ((3,), 0, 12), ((2, 3), 0, 12), ((3,), 8, 0)]
)
def test_linear_gelu_zero_size(backend, lead, k, n, device):
    x, w, b = _leaves(
        torch.randn(*lead, k, device=device),
        torch.randn(n, k, device=device),
        torch.randn(n, device=device),
    )
    y = fastlm.linear_gelu(x, w, b, approximate="tanh", backend=backend)
    assert y.shape == (*lead, n)
    expected = ref.linear_gelu(x.detach(), w.detach(), b.detach(), "tanh")
    torch.testing.assert_close(y, expected)  # K = 0: gelu(bias) in every row
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [x, w, b], dy, allow_unused=False)
    xo, wo, bo = _leaves(x, w, b)
    ref.linear_gelu(xo, wo, bo, "tanh").backward(dy)
    for g, o in ((gx, xo), (gw, wo), (gb, bo)):
        assert g.shape == o.shape
        torch.testing.assert_close(g, o.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_ffn_zero_rows(backend, device):
    x = torch.randn(0, 3, 8, device=device)
    w1, b1, w2, b2 = _leaves(
        *(torch.randn(s, device=device) for s in ((16, 8), (16,), (8, 16), (8,)))
    )
    r = torch.randn(0, 3, 8, device=device)
    out = fastlm.gelu_ffn(x, w1, b1, w2, b2, residual=r, backend=backend)
    assert out.shape == (0, 3, 8)
    grads = torch.autograd.grad(out, [w1, b1, w2, b2], torch.ones_like(out))
    for g, t in zip(grads, (w1, b1, w2, b2)):
        assert g.shape == t.shape and not g.any()


def _aten_ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_torch_backend_overwrites_its_fresh_outputs_where_autograd_records_nothing(
    mode, dtype, approximate
):
    """Without autograd the torch backend's GELU and residual add run in place on the GEMMs'
    outputs (one activation fewer), with the very values of the out-of-place ops; the inputs
    (x, the residual, the weights) are left as they were."""
    torch.manual_seed(0)
    x, r = torch.randn(2, 7, 24, dtype=dtype), torch.randn(2, 7, 16, dtype=dtype)
    w1, b1 = _weight(40, 24, dtype, "cpu"), torch.randn(40, dtype=dtype)
    w2, b2 = _weight(16, 40, dtype, "cpu", transposed=True), torch.randn(16, dtype=dtype)
    if mode == "frozen":  # grad mode on, nothing requires grad: autograd records nothing
        context = torch.enable_grad()
    else:
        context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    kept = [t.clone() for t in (x, r, w1, b1, w2, b2)]
    with context:
        run = lambda: fastlm.gelu_ffn(x, w1, b1, w2, b2, approximate=approximate, residual=r,
                                      backend="torch")  # fmt: skip
        out = run()
        ops = _aten_ops(run)
        first = fastlm.linear_gelu(x, w1, b1, approximate=approximate, backend="torch")
    # PyTorch's own out-of-place ops in the same dtype: equal bit for bit
    h = F.gelu(F.linear(x, w1, b1), approximate=approximate)
    expected = F.linear(h, w2, b2) + r
    assert torch.equal(out, expected)
    assert torch.equal(first, h)
    assert {"aten::gelu_", "aten::add_"} <= ops and "aten::gelu" not in ops, sorted(ops)
    for before, after in zip(kept, (x, r, w1, b1, w2, b2)):
        assert torch.equal(before, after)


def test_torch_backend_keeps_gelus_input_for_backward():
    """With autograd recording, GELU runs out of place (its backward reads its input) and
    every gradient matches PyTorch's own ops."""
    torch.manual_seed(0)
    x, w1, b1, w2, b2, r = _leaves(
        *(torch.randn(s) for s in ((5, 8), (16, 8), (16,), (8, 16), (8,), (5, 8)))
    )
    ops = _aten_ops(lambda: fastlm.gelu_ffn(x, w1, b1, w2, b2, residual=r, backend="torch"))
    assert "aten::gelu" in ops and "aten::gelu_" not in ops, sorted(ops)
    out = fastlm.gelu_ffn(x, w1, b1, w2, b2, residual=r, backend="torch")
    ref_leaves = _leaves(x, w1, b1, w2, b2, r)
    rx, rw1, rb1, rw2, rb2, rr = ref_leaves
    expected = F.linear(F.gelu(F.linear(rx, rw1, rb1)), rw2, rb2) + rr
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, w1, b1, w2, b2, r], g)
    expected_grads = torch.autograd.grad(expected, ref_leaves, g)
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------ bad inputs


def _ok(**over):
    t = {
        "x": torch.randn(3, 4),
        "w1": torch.randn(6, 4),
        "b1": torch.randn(6),
        "w2": torch.randn(5, 6),
        "b2": torch.randn(5),
        "residual": None,
        "approximate": "none",
        "backend": None,
    }
    t.update(over)
    return t


def _lg(t):
    return fastlm.linear_gelu(
        t["x"], t["w1"], t["b1"], approximate=t["approximate"], backend=t["backend"]
    )


def _ffn(t):
    return fastlm.gelu_ffn(
        t["x"], t["w1"], t["b1"], t["w2"], t["b2"],
        approximate=t["approximate"], residual=t["residual"], backend=t["backend"],
    )  # fmt: skip


BAD = [
    (
        "x-fp64",
        _lg,
        {"x": torch.randn(3, 4, dtype=torch.float64)},
        TypeError,
        r"x must be one of .*got float64",
    ),
    ("x-int", _lg, {"x": torch.ones(3, 4, dtype=torch.int32)}, TypeError, r"got int32"),
    ("x-list", _lg, {"x": [[1.0] * 4]}, TypeError, r"x must be a torch.Tensor, got list"),
    ("x-0d", _lg, {"x": torch.tensor(1.0)}, ValueError, r"at least 1 dimension"),
    ("x-strided-last", _lg, {"x": torch.randn(4, 3).t()}, ValueError, r"contiguous last dimension"),
    (
        "w-dtype",
        _lg,
        {"w1": torch.randn(6, 4, dtype=torch.float16)},
        TypeError,
        r"weight has dtype float16 but x has float32",
    ),
    (
        "b-dtype",
        _lg,
        {"b1": torch.randn(6, dtype=torch.float16)},
        TypeError,
        r"bias has dtype float16",
    ),
    (
        "w-1d",
        _lg,
        {"w1": torch.randn(4)},
        ValueError,
        r"weight must be 2-D \(out_features, in_features\).*\(4,\)",
    ),
    (
        "w-k",
        _lg,
        {"w1": torch.randn(6, 5)},
        ValueError,
        r"weight has in_features 5 .* x has 4 features",
    ),
    ("b-len", _lg, {"b1": torch.randn(7)}, ValueError, r"bias must have shape \(6,\).*got \(7,\)"),
    (
        "w-device",
        _lg,
        {"w1": torch.randn(6, 4, device="meta")},
        ValueError,
        r"weight is on meta but x is on cpu",
    ),
    (
        "approx",
        _lg,
        {"approximate": "erf"},
        ValueError,
        r"approximate must be one of \('none', 'tanh'\), got 'erf'",
    ),
    (
        "backend-cuda",
        _lg,
        {"backend": "cuda"},
        BackendUnavailableError,
        r"backend 'cuda' cannot serve",
    ),
    ("backend-name", _lg, {"backend": "cudnn"}, ValueError, r"unknown backend 'cudnn'"),
    (
        "w2-k",
        _ffn,
        {"w2": torch.randn(5, 7)},
        ValueError,
        r"w2 has in_features 7 .* intermediate activation has 6 features",
    ),
    ("b2-len", _ffn, {"b2": torch.randn(6)}, ValueError, r"b2 must have shape \(5,\).*got \(6,\)"),
    (
        "w2-dtype",
        _ffn,
        {"w2": torch.randn(5, 6, dtype=torch.float16)},
        TypeError,
        r"w2 has dtype float16",
    ),
    (
        "w2-fp64",
        _ffn,
        {"w2": torch.randn(5, 6, dtype=torch.float64)},
        TypeError,
        r"w2 must be one of .*got float64",
    ),
    (
        "res-shape",
        _ffn,
        {"residual": torch.randn(3, 4)},
        ValueError,
        r"residual must have the output's shape \(3, 5\), got \(3, 4\)",
    ),
    (
        "res-dtype",
        _ffn,
        {"residual": torch.randn(3, 5, dtype=torch.float16)},
        TypeError,
        r"residual has dtype float16",
    ),
    (
        "res-device",
        _ffn,
        {"residual": torch.randn(3, 5, device="meta")},
        ValueError,
        r"residual is on meta",
    ),
    ("ffn-approx", _ffn, {"approximate": None}, ValueError, r"approximate must be one of"),
]


@pytest.mark.parametrize("name,fn,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, fn, over, exc, msg):
    with pytest.raises(exc, match=msg):
        fn(_ok(**over))


def test_bad_inputs_name_the_op():
    with pytest.raises(ValueError, match=r"^fastlm.gelu_ffn: "):
        _ffn(_ok(b1=torch.randn(2)))
    with pytest.raises(ValueError, match=r"^fastlm.linear_gelu: "):
        _lg(_ok(b1=torch.randn(2)))


# ------------------------------------------------------------------ compile / opcheck


@pytest.mark.parametrize("backend", ["torch", "reference"])  # native autograd; custom ops
def test_torch_compile_fullgraph_with_backward(backend):
    x, w1, b1, w2, b2, r = _leaves(
        *(torch.randn(s) for s in ((2, 3, 8), (16, 8), (16,), (8, 16), (8,), (2, 3, 8)))
    )

    def f(x, w1, b1, w2, b2, r):
        y = fastlm.linear_gelu(x, w1, b1, approximate="tanh", backend=backend)
        z = fastlm.gelu_ffn(x, w1, b1, w2, b2, residual=r, backend=backend)
        return (y * y).sum() + (z * z).sum()

    leaves = [x, w1, b1, w2, b2, r]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    x, w1, b1, w2, b2, r = _leaves(
        *(torch.randn(s, device=device) for s in ((5, 8), (12, 8), (12,), (8, 12), (8,), (5, 8)))
    )
    torch.library.opcheck(op.linear_gelu_fwd, (x, w1, b1, "tanh", True, backend))
    torch.library.opcheck(op.linear_gelu_fwd, (x, w1, None, "none", False, backend))
    torch.library.opcheck(op.gelu_ffn_fwd, (x, w1, b1, w2, b2, r, "none", True, backend))
    torch.library.opcheck(op.gelu_ffn_fwd, (x, w1, None, w2, None, None, "tanh", True, backend))
    dy = torch.randn(5, 12, device=device)
    h = torch.randn(5, 12, device=device)
    torch.library.opcheck(
        op.linear_gelu_bwd,
        (dy, x.detach(), w1.detach(), b1.detach(), h, "none", True, True, True, backend),
    )
    a = torch.randn(5, 12, device=device)
    dout = torch.randn(5, 8, device=device)
    args = (
        dout,
        x.detach(),
        w1.detach(),
        b1.detach(),
        w2.detach(),
        a,
        h,
        "tanh",
        [True] * 5,
        backend,
    )
    torch.library.opcheck(op.gelu_ffn_bwd, args)
