"""lm_logits: F.linear(h, W) for an LM head, computed as (W h^T)^T for a few rows on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastlm.models import lm_logits as module
from fastlm.models.lm_logits import FEW_ROWS, lm_logits


@pytest.fixture(autouse=True)
def _small_weights_take_the_few_rows_form(monkeypatch):
    monkeypatch.setattr(module, "LARGE_WEIGHT", 1)


@pytest.mark.parametrize("lead", [(1,), (2,), (3, 1), (4,), (16,), (17,), (2, 9)])
def test_matches_linear_and_fp64_with_gradients(lead):
    torch.manual_seed(0)
    h = torch.randn(*lead, 24, requires_grad=True)
    w = torch.randn(37, 24, requires_grad=True)
    got = lm_logits(h, w)
    assert got.shape == (*lead, 37) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(h, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), F.linear(h.double(), w.double()), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    (dh, dw) = torch.autograd.grad(got, (h, w), g)
    (rh, rw) = torch.autograd.grad(F.linear(h, w), (h, w), g)
    torch.testing.assert_close(dh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, rw, atol=1e-5, rtol=1e-5)


def test_the_few_rows_form_serves_decode_batches():
    assert 1 not in FEW_ROWS and all(r in FEW_ROWS for r in (2, 4, 16))
    assert module.LARGE_WEIGHT <= 50257 * 768  # GPT-2's LM head takes it
    # A strided weight (a transposed view) keeps F.linear: the tall GEMM needs W row-major.
    w = torch.randn(24, 37).t()
    h = torch.randn(4, 24)
    torch.testing.assert_close(lm_logits(h, w), F.linear(h, w))
