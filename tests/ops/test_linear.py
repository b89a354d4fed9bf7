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
