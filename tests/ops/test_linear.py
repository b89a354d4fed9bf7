"""fastlm.ops.linear: F.linear, with each CPU product in the form this host runs fastest
(F.linear, the streamed (W x^T + b)^T of few rows, oneDNN's inner product where autograd
records nothing, half precision widened to fp32): the same result to the rounding of the
dtype, with gradients, for every row count; the form chosen by timing real calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastlm.ops import linear as module
from fastlm.ops.linear import FEW_ROWS, linear

needs_onednn = pytest.mark.skipif(not module.ONEDNN, reason="this PyTorch build has no oneDNN")


@pytest.fixture
def small_weights(monkeypatch):
    """The test's small weights are served by every form, as a model's large ones are."""
    monkeypatch.setattr(module, "MEASURED_WEIGHT", 1)
    monkeypatch.setattr(module, "STREAMED_WEIGHT", 1)
    monkeypatch.setattr(module, "_measured", {})
    monkeypatch.setattr(module, "_trials", {})


def _spy(monkeypatch) -> list[str]:
    """Records the name of each fp32 form that runs a product (the widened form's inner
    product included)."""
    seen: list[str] = []
    for name, attr in (("streamed", "_streamed"), ("onednn", "_onednn")):
        real = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, _r=real, _n=name: seen.append(_n) or _r(*a))
    real_linear = module.F.linear
    monkeypatch.setattr(
        module.F, "linear", lambda *a, **k: seen.append("linear") or real_linear(*a, **k)
    )
    return seen


def _operands(lead, bias, dtype=torch.float32, grad=False):
    x = torch.randn(*lead, 24, dtype=dtype, requires_grad=grad)
    w = torch.randn(37, 24, dtype=dtype, requires_grad=grad)
    b = torch.randn(37, dtype=dtype, requires_grad=grad) if bias else None
    return x, w, b


def _oracle(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


LEADS = [(1,), (2,), (3, 1), (16,), (17,), (2, 9), (3, 50), (0,)]


@pytest.mark.parametrize("form", ["linear", "streamed"])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_differentiable_forms_match_linear_and_fp64_with_gradients(small_weights, monkeypatch,
                                                                   form, lead, bias):  # fmt: skip
    monkeypatch.setattr(module, "FORM", form)
    seen = _spy(monkeypatch)
    x, w, b = _operands(lead, bias, grad=True)
    got = linear(x, w, b)
    served = seen[0] if seen else None
    assert served == (form if form == "linear" or 0 < x.numel() // 24 <= 16 else "linear")
    assert got.shape == (*lead, 37) and got.is_contiguous()
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), _oracle(x, w, b), atol=1e-5, rtol=1e-5)
    if not got.numel():
        return
    g = torch.randn_like(got)
    inputs = (x, w) if b is None else (x, w, b)
    for ours, ref in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("weight_layout", ["row_major", "transposed"])
@pytest.mark.parametrize("context", ["inference_mode", "no_grad", "frozen"])
def test_onednn_matches_linear_and_fp64(small_weights, monkeypatch, lead, bias, weight_layout,
                                        context):  # fmt: skip
    """Where autograd records nothing: under inference_mode or no_grad, or with no operand
    requiring grad; for a row-major weight and for GPT-2 Conv1D's transposed view."""
    monkeypatch.setattr(module, "FORM", "onednn")
    seen = _spy(monkeypatch)
    x, w, b = _operands(lead, bias, grad=context != "frozen")
    if weight_layout == "transposed":
        w = w.detach().t().contiguous().t().requires_grad_(context != "frozen")
    guard = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(context)
    with guard() if guard else torch.enable_grad():
        got = linear(x, w, b)
    assert seen == (["onednn"] if x.numel() else ["linear"])
    assert got.shape == (*lead, 37) and got.is_contiguous() and not got.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.double(), _oracle(x, w, b), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_onednn_serves_only_what_autograd_does_not_record_and_reads_right(small_weights,
                                                                         monkeypatch):  # fmt: skip
    monkeypatch.setattr(module, "FORM", "onednn")
    monkeypatch.setattr(module, "HALF_FORM", "native")
    seen = _spy(monkeypatch)
    x, w, b = _operands((5,), bias=True)
    linear(x, w, b)  # nothing requires grad
    linear(x, w.requires_grad_(), b)  # a trainable weight: recorded, F.linear
    linear(x.half(), w.detach().half())  # a half product, kept native
    w = w.detach()
    strided = torch.randn(74)[::2]
    got = linear(x, w, strided)  # a strided bias: oneDNN would read it wrong
    torch.testing.assert_close(got, F.linear(x, w, strided))
    linear(x, torch.randn(37, 50)[:, :24])  # rows strided: outside what the guard admits
    linear(x, torch.randn(24, 50).t()[:37])  # columns strided: oneDNN raises
    linear(torch.randn(24, 5).t(), w)  # non-contiguous rows
    assert seen[0] == "onednn" and set(seen[1:]) == {"linear"}, seen


@needs_onednn
def test_a_trial_times_each_form_on_real_calls_and_keeps_the_fastest_per_row(
    small_weights, monkeypatch
):
    """Round robin over the forms, each call timed; the first call of each form is not
    counted; after TRIAL_RUNS timed calls of each the key keeps the least median time per
    row.
    Row counts of one power of two share a key (their times are compared per row)."""
    monkeypatch.setattr(module, "FORM", "measure")
    monkeypatch.setattr(module, "TRIAL_RUNS", 1)  # one timed call: the first would count half
    seen = _spy(monkeypatch)
    # A clock each form advances by its cost per row. F.linear's first call is the fastest
    # of all and must not count; the round robin hands F.linear the smaller row counts, so
    # only times per row rank oneDNN (1.2 per row against 2.0) first.
    cost = {"linear": 2.0, "onednn": 1.2}
    clock = SimpleNamespace(now=0.0, rows=0, first=True)
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    for name, real in (("linear", module.F.linear), ("onednn", module._onednn)):

        def timed(*a, _r=real, _n=name, **k):
            clock.now += 0.0 if clock.first else cost[_n] * clock.rows
            clock.first = False
            return _r(*a, **k)

        monkeypatch.setattr(*((module.F, "linear") if name == "linear" else (module, "_onednn")),
                            timed)  # fmt: skip
    w, b = torch.randn(37, 24), torch.randn(37)
    runs = module.TRIAL_RUNS + 1
    with torch.inference_mode():
        for i in range(2 * runs + 3):
            clock.rows = (260, 500)[i % 2]  # one class: 256-511 rows
            x = torch.randn(clock.rows, 24)
            want = torch.addmm(b, x, w.t())  # not F.linear: seen lists the products only
            torch.testing.assert_close(linear(x, w, b), want, atol=1e-5, rtol=1e-5)
    assert seen[: 2 * runs] == ["linear", "onednn"] * runs
    assert seen[2 * runs :] == ["onednn"] * 3
    (key,) = module._measured
    assert key[0] == 256 and module._measured[key] == "onednn" and not module._trials
    assert module._trial_class(600) == 512 and module._trial_class(16) == 16


@needs_onednn
def test_a_key_settled_without_autograd_never_serves_a_recorded_product(small_weights,
                                                                       monkeypatch):  # fmt: skip
    """Whether autograd records is part of the key: a shape settled on oneDNN under
    inference_mode still takes a differentiable form when a trainable weight comes."""
    monkeypatch.setattr(module, "FORM", "measure")
    x, w = torch.randn(300, 24), torch.randn(37, 24)
    with torch.inference_mode():
        for _ in range(2 * (module.TRIAL_RUNS + 1)):
            linear(x, w)
    (key,) = module._measured
    module._measured[key] = "onednn"  # as if oneDNN had won here
    seen = _spy(monkeypatch)
    trainable = w.clone().requires_grad_()
    got = linear(x, trainable)
    assert seen == ["linear"] and got.requires_grad
    (grad,) = torch.autograd.grad(got.sum(), trainable)
    torch.testing.assert_close(grad, x.sum(0).expand(37, 24))


@pytest.mark.parametrize("linear_ms, streamed_ms", [(1.0, 2.0), (2.0, 1.0)])
def test_few_row_keys_settle_on_the_faster_of_linear_and_streamed(
    small_weights, monkeypatch, linear_ms, streamed_ms
):
    """With autograd recording, oneDNN may not serve: the trial is between F.linear and the
    streamed form, each few-row count a key of its own."""
    monkeypatch.setattr(module, "FORM", "measure")
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    for attr, ms in (("_streamed", streamed_ms),):
        real = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, _r=real, _ms=ms: setattr(
            clock, "now", clock.now + _ms) or _r(*a))  # fmt: skip
    real_linear = module.F.linear
    monkeypatch.setattr(module.F, "linear", lambda *a, **k: setattr(
        clock, "now", clock.now + linear_ms) or real_linear(*a, **k))  # fmt: skip
    w = torch.randn(37, 24, requires_grad=True)
    for rows in (2, 3):
        for _ in range(2 * (module.TRIAL_RUNS + 1)):
            linear(torch.randn(rows, 24), w).sum().backward()
    want = "linear" if linear_ms < streamed_ms else "streamed"
    assert sorted((k[0], v) for k, v in module._measured.items()) == [(2, want), (3, want)]
    assert all(k[-1] for k in module._measured)  # keys of recorded products: no oneDNN


def test_what_keeps_f_linear(monkeypatch):
    monkeypatch.setattr(module, "FORM", "measure")
    seen = _spy(monkeypatch)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        linear(x, torch.randn(5, 8))  # a weight under MEASURED_WEIGHT: no trial
        monkeypatch.setattr(module, "MEASURED_WEIGHT", 1)
        monkeypatch.setattr(module, "FORM", "streamed")
        linear(torch.randn(17, 8), torch.randn(5, 8))  # many rows: no streamed form
        linear(x, torch.randn(8, 5).t())  # a column-major weight: not the row-major stream
    assert seen == ["linear"] * 3
    assert 1 in FEW_ROWS and 16 in FEW_ROWS and 17 not in FEW_ROWS


def test_pinned_forms_and_a_wrong_setting(small_weights, monkeypatch):
    seen = _spy(monkeypatch)
    monkeypatch.setattr(module, "FORM", "linear")
    with torch.inference_mode():
        linear(torch.randn(2, 8), torch.randn(5, 8))
    assert seen == ["linear"]
    monkeypatch.setattr(module, "FORM", "fastest")
    with pytest.raises(ValueError, match="FASTLM_CPU_LINEAR must be one of"):
        linear(torch.randn(2, 8), torch.randn(5, 8))


def test_gpt2_weights_are_past_the_streamed_bound():
    # Every GEMM of GPT-2 124M's decode step (768 x 2304 ... 50257 x 768) streams.
    assert module.STREAMED_WEIGHT <= 768 * 768


def test_compiled_calls_trace_f_linear(small_weights, monkeypatch):
    monkeypatch.setattr(module, "FORM", "streamed")
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    compiled = torch.compile(linear, fullgraph=True, dynamic=True, backend="eager")
    torch.testing.assert_close(compiled(x, w, b), F.linear(x, w, b))


# ------------------------------------------------------------------ half precision, widened


@pytest.fixture
def widened(monkeypatch):
    """Small test weights take the widened form, whatever this host measures."""
    monkeypatch.setattr(module, "MEASURED_WEIGHT", 1)
    monkeypatch.setattr(module, "HALF_FORM", "widened")


def _widened_calls(monkeypatch):
    """Records the dtype of every product handed to F.linear, the widened form's fp32
    product pinned to F.linear (test_widened_fp32_product_takes_onednn_where_it_may covers
    the other forms)."""
    monkeypatch.setattr(module, "FORM", "linear")
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
    linear(x, w)  # a weight below MEASURED_WEIGHT: not worth a measurement
    monkeypatch.setattr(module, "MEASURED_WEIGHT", 1)
    linear(x.float(), w.float())  # fp32 is what the widened form computes in already
    with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's own error, not a silent cast
        linear(x, w.float())
    monkeypatch.setattr(module, "HALF_FORM", "native")
    linear(x, w)
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("widened_ms, native_ms, wins", [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_half_form_is_measured_once_per_row_class(monkeypatch, widened_ms, native_ms, wins):
    monkeypatch.setattr(module, "MEASURED_WEIGHT", 1)
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
    monkeypatch.setattr(module, "MEASURED_WEIGHT", 1)
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
    monkeypatch.setattr(module, "MEASURED_WEIGHT", 1)
    monkeypatch.setattr(module, "HALF_FORM", "fastest")
    with pytest.raises(ValueError, match="FASTLM_CPU_HALF_LINEAR must be one of"):
        linear(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16))


@needs_onednn
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_widened_fp32_product_takes_onednn_where_it_may(widened, monkeypatch, dtype):
    """The widened form's fp32 product is an fp32 product like any other: oneDNN may serve
    it where autograd records nothing, and the half result is the same to its rounding."""
    monkeypatch.setattr(module, "FORM", "onednn")
    seen = _spy(monkeypatch)
    x, w, b = _operands((3, 50), bias=True, dtype=dtype, grad=True)
    with torch.inference_mode():
        got = linear(x, w, b)
    trained = linear(x, w, b)  # recorded: F.linear on the widened operands
    assert seen == ["onednn", "linear"]
    assert got.dtype == trained.dtype == dtype
    with torch.no_grad():
        want = F.linear(x, w, b)
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(got, trained, **TOL[dtype])
        torch.testing.assert_close(got.double(), _oracle(x, w, b), **TOL[dtype])


# ------------------------------------------------- half-precision layers computed in fp32


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("lead", [(1,), (3, 1), (17,), (2, 150), (0,)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_an_fp32_input_widens_half_weights_exactly_with_gradients(monkeypatch, dtype, lead, bias):
    """A layer computed in fp32 hands its products an fp32 x and its own half weights: the
    product is the fp32 one on the exactly widened weights (the same bits, F.linear's form
    pinned), in fp32, and the gradients reach the half parameters in their own dtype."""
    monkeypatch.setattr(module, "FORM", "linear")
    torch.manual_seed(0)
    x = torch.randn(*lead, 24, requires_grad=True)
    w = torch.randn(37, 24, dtype=dtype, requires_grad=True)
    b = torch.randn(37, dtype=dtype, requires_grad=True) if bias else None
    got = linear(x, w, b)
    wide = [t.detach().float().requires_grad_() for t in ((w,) if b is None else (w, b))]
    want = F.linear(x, *wide)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    if not got.numel():
        return
    g = torch.randn_like(got)
    inputs = (x, w) if b is None else (x, w, b)
    ours = torch.autograd.grad(got, inputs, g)
    ref = torch.autograd.grad(want, (x, *wide), g)
    assert [t.dtype for t in ours] == [torch.float32] + [dtype] * len(wide)
    for o, r in zip(ours, ref):
        assert torch.equal(o, r.to(o.dtype))  # one rounding of the fp32 gradient


def test_which_layers_run_in_fp32(monkeypatch):
    """widens_layer: a half layer on CPU whose largest product takes the widened form, and
    nothing else (an fp32 layer, the native form pinned or measured faster, autocast, a
    weight too small to measure, no rows, mixed dtypes)."""
    from fastlm.ops.linear import widens_layer

    bf16 = torch.bfloat16
    x, w, b = (
        torch.randn(3, 8, dtype=bf16),
        torch.randn(5, 8, dtype=bf16),
        torch.randn(5, dtype=bf16),
    )
    monkeypatch.setattr(module, "HALF_FORM", "widened")
    assert not widens_layer(x, w, b)  # a 5 x 8 weight: below MEASURED_WEIGHT
    monkeypatch.setattr(module, "MEASURED_WEIGHT", 1)
    assert widens_layer(x, w, b) and widens_layer(x, w)
    assert not widens_layer(x.float(), w.float(), b.float())
    assert not widens_layer(x[:0], w, b)
    assert not widens_layer(x, w.half(), b.half())
    with torch.autocast("cpu", dtype=bf16):
        assert not widens_layer(x, w, b)
    monkeypatch.setattr(module, "HALF_FORM", "native")
    assert not widens_layer(x, w, b)
    monkeypatch.setattr(module, "HALF_FORM", "measure")
    monkeypatch.setattr(module, "_measured", {})
    for widened_ms, native_ms in ((1.0, 2.0), (2.0, 1.0)):
        module._measured.clear()
        times = iter([widened_ms, native_ms])
        monkeypatch.setattr(module, "_best_ms", lambda fn, times=times: next(times))
        assert widens_layer(x, w, b) == (widened_ms < native_ms)
