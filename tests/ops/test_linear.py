"""fastlm.ops.linear: F.linear, with the few-row products of a CPU decode step computed as
(W x^T + b)^T; the same result to fp32 rounding, with gradients, for every row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastlm.ops import linear as module
from fastlm.ops.linear import FEW_ROWS, linear


@pytest.fixture
def streamed(monkeypatch):
    """Small test weights take the streamed form too, whatever this host measures."""
    monkeypatch.setattr(module, "STREAMED_WEIGHT", 1)
    monkeypatch.setattr(module, "FORM", "streamed")


def _calls(monkeypatch):
    """Counts the torch.mm / torch.addmm calls the streamed form makes."""
    seen = []
    for name in ("mm", "addmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(
            module.torch, name, lambda *a, _r=real, _n=name, **k: seen.append(_n) or _r(*a, **k)
        )
    return seen


@pytest.mark.parametrize("lead", [(1,), (2,), (3, 1), (16,), (17,), (2, 9), (0,)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_linear_and_fp64_with_gradients(streamed, lead, bias):
    torch.manual_seed(0)
    x = torch.randn(*lead, 24, requires_grad=True)
    w = torch.randn(37, 24, requires_grad=True)
    b = torch.randn(37, requires_grad=True) if bias else None
    got = linear(x, w, b)
    assert got.shape == (*lead, 37) and got.is_contiguous()
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    oracle = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), oracle, atol=1e-5, rtol=1e-5)
    if not got.numel():
        return
    g = torch.randn_like(got)
    inputs = (x, w) if b is None else (x, w, b)
    for ours, ref in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_few_rows_take_the_streamed_form(streamed, monkeypatch, rows):
    seen = _calls(monkeypatch)
    linear(torch.randn(rows, 8), torch.randn(5, 8), torch.randn(5))
    linear(torch.randn(rows, 8), torch.randn(5, 8))
    assert seen == ["addmm", "mm"]


def test_what_keeps_f_linear(monkeypatch):
    seen = _calls(monkeypatch)
    x = torch.randn(4, 8)
    linear(x, torch.randn(5, 8))  # a small weight stays in cache: F.linear
    monkeypatch.setattr(module, "STREAMED_WEIGHT", 1)
    linear(torch.randn(17, 8), torch.randn(5, 8))  # many rows: a compute-bound GEMM
    linear(x, torch.randn(8, 5).t())  # a column-major weight: not the row-major stream
    assert seen == []
    assert 1 in FEW_ROWS and 16 in FEW_ROWS and 17 not in FEW_ROWS


@pytest.mark.parametrize("streamed_ms, linear_ms, wins", [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_measured_form_is_the_faster_one_and_measured_once(monkeypatch, streamed_ms, linear_ms,
                                                           wins):  # fmt: skip
    monkeypatch.setattr(module, "STREAMED_WEIGHT", 1)
    monkeypatch.setattr(module, "FORM", "measure")
    monkeypatch.setattr(module, "_measured", {})
    timings = iter([streamed_ms, linear_ms])
    measured = []
    monkeypatch.setattr(module, "_best_ms", lambda fn: measured.append(fn) or next(timings))
    seen = _calls(monkeypatch)
    w = torch.randn(5, 8)
    for _ in range(3):
        got = linear(torch.randn(2, 8), w)
    assert len(measured) == 2  # both forms timed, once for this key
    assert seen == (["mm"] * 3 if wins else [])
    assert got.shape == (2, 5)


def test_pinned_forms_and_a_wrong_setting(monkeypatch):
    monkeypatch.setattr(module, "STREAMED_WEIGHT", 1)
    seen = _calls(monkeypatch)
    monkeypatch.setattr(module, "FORM", "linear")
    linear(torch.randn(2, 8), torch.randn(5, 8))
    assert seen == []
    monkeypatch.setattr(module, "FORM", "fastest")
    with pytest.raises(ValueError, match="FASTLM_CPU_LINEAR must be one of"):
        linear(torch.randn(2, 8), torch.randn(5, 8))


def test_gpt2_weights_are_past_the_streamed_bound():
    # Every GEMM of GPT-2 124M's decode step (768 x 2304 ... 50257 x 768) streams.
    assert module.STREAMED_WEIGHT <= 768 * 768


def test_compiled_calls_trace_f_linear(streamed):
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    compiled = torch.compile(linear, fullgraph=True, dynamic=True, backend="eager")
    torch.testing.assert_close(compiled(x, w, b), F.linear(x, w, b))


# ------------------------------------------------------------------ half precision, widened


@pytest.fixture
def widened(monkeypatch):
    """Small test weights take the widened form, whatever this host measures."""
    monkeypatch.setattr(module, "WIDENED_WEIGHT", 1)
    monkeypatch.setattr(module, "HALF_FORM", "widened")


def _widened_calls(monkeypatch):
    """Records the dtype of every product the widened form hands to F.linear."""
    seen = []
    real = module.F.linear
    monkeypatch.setattr(
        module.F, "linear", lambda x, *a, **k: seen.append(x.dtype) or real(x, *a, **k)
    )
    return seen


HALF = [torch.bfloat16, torch.float16]
# One rounding of the output in the half dtype (2^-8 for bf16, 2^-11 for fp16) on values of
# magnitude ~5 (sums of 24 unit products), plus the inputs' own rounding for the gradients.
TOL = {torch.bfloat16: dict(atol=0.06, rtol=1e-2), torch.float16: dict(atol=8e-3, rtol=2e-3)}


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("lead", [(1,), (3, 1), (17,), (2, 150), (0,)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_widened_matches_the_native_half_gemm_and_fp64_with_gradients(widened, dtype, lead,
                                                                       bias):  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(*lead, 24, dtype=dtype, requires_grad=True)
    w = torch.randn(37, 24, dtype=dtype, requires_grad=True)
    b = torch.randn(37, dtype=dtype, requires_grad=True) if bias else None
    got = linear(x, w, b)
    assert got.dtype == dtype and got.shape == (*lead, 37) and got.is_contiguous()
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want, **TOL[dtype])
    oracle = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), oracle, **TOL[dtype])
    if not got.numel():
        return
    # Exact operands, one rounding: at least as close to fp64 as the native GEMM, to an ulp.
    ulp = torch.finfo(dtype).eps * oracle.abs().max()
    assert (got.double() - oracle).abs().max() <= (want.double() - oracle).abs().max() + ulp
    g = torch.randn_like(got)
    inputs = (x, w) if b is None else (x, w, b)
    grads = torch.autograd.grad(got, inputs, g)
    want_grads = torch.autograd.grad(want, inputs, g)
    double = [t.detach().double().requires_grad_() for t in inputs]
    oracle_grads = torch.autograd.grad(F.linear(*double), double, g.double())
    for ours, ref, exact in zip(grads, want_grads, oracle_grads):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, ref, **TOL[dtype])
        torch.testing.assert_close(ours.double(), exact, **TOL[dtype])


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_half_products_take_the_widened_form(widened, monkeypatch, dtype):
    seen = _widened_calls(monkeypatch)
    w = torch.randn(5, 8, dtype=dtype)
    for rows in (1, 16, 17, 300):
        linear(torch.randn(rows, 8, dtype=dtype), w, torch.randn(5, dtype=dtype))
    assert seen == [torch.float32] * 4


def test_what_keeps_the_native_half_gemm(monkeypatch):
    seen = _widened_calls(monkeypatch)
    monkeypatch.setattr(module, "HALF_FORM", "widened")
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    linear(x, w)  # a weight below WIDENED_WEIGHT: not worth a measurement
    monkeypatch.setattr(module, "WIDENED_WEIGHT", 1)
    linear(x.float(), w.float())  # fp32 is what the widened form computes in already
    with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's own error, not a silent cast
        linear(x, w.float())
    monkeypatch.setattr(module, "HALF_FORM", "native")
    linear(x, w)
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("widened_ms, native_ms, wins", [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_half_form_is_measured_once_per_row_class(monkeypatch, widened_ms, native_ms, wins):
    monkeypatch.setattr(module, "WIDENED_WEIGHT", 1)
    monkeypatch.setattr(module, "HALF_FORM", "measure")
    monkeypatch.setattr(module, "_measured", {})
    measured = []
    monkeypatch.setattr(
        module,
        "_best_ms",
        lambda fn: measured.append(fn) or (widened_ms if len(measured) % 2 else native_ms),
    )
    seen = _widened_calls(monkeypatch)
    w = torch.randn(5, 8, dtype=torch.bfloat16)
    for rows in (300, 1000, 17, 300):  # one class above FEW_ROWS, timed at PROBE_ROWS
        linear(torch.randn(rows, 8, dtype=torch.bfloat16), w)
    assert len(measured) == 2 and list(module._measured) == [
        ("widened", module.PROBE_ROWS, (5, 8), torch.bfloat16, False)
    ]
    linear(torch.randn(3, 8, dtype=torch.bfloat16), w)  # a few-row class of its own
    assert len(measured) == 4
    products = [d for d in seen if d in (torch.float32, torch.bfloat16)]
    expected = torch.float32 if wins else torch.bfloat16
    assert products[-5:] == [expected] * 5  # the timing runs' products come first


@pytest.mark.parametrize("form", ["widened", "native"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_under_autocast_it_is_autocasts_linear(monkeypatch, form, bias):
    """fp32 operands inside torch.autocast("cpu", bf16): autocast's output dtype, its
    inputs' rounding, and fp32 gradients for the fp32 leaves, as F.linear under autocast."""
    monkeypatch.setattr(module, "WIDENED_WEIGHT", 1)
    monkeypatch.setattr(module, "HALF_FORM", form)
    torch.manual_seed(0)
    x = torch.randn(2, 150, 24, requires_grad=True)
    w = torch.randn(37, 24, requires_grad=True)
    b = torch.randn(37, requires_grad=True) if bias else None
    inputs = (x, w) if b is None else (x, w, b)
    g = torch.randn(2, 150, 37, dtype=torch.bfloat16)
    seen = _widened_calls(monkeypatch)
    real_widened = module._widened
    widened_calls = []
    monkeypatch.setattr(module, "_widened", lambda *a: widened_calls.append(a) or real_widened(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear(x, w, b)
        assert seen == [torch.float32 if form == "widened" else torch.bfloat16]
        assert (
            [t.dtype for t in widened_calls[0][:2]] == [torch.bfloat16] * 2
            if form == "widened"
            else not widened_calls
        )
        want = F.linear(x, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    if form == "native":  # the same casts and the same GEMM: the same bits
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    for ours, ref in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref, **TOL[torch.bfloat16])


def test_pinned_half_form_and_a_wrong_setting(monkeypatch):
    monkeypatch.setattr(module, "WIDENED_WEIGHT", 1)
    monkeypatch.setattr(module, "HALF_FORM", "fastest")
    with pytest.raises(ValueError, match="FASTLM_CPU_HALF_LINEAR must be one of"):
        linear(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16))
