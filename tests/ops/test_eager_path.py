"""Eager calls that record no autograd skip the custom op (fastlm.ops._eager); every other
call (autograd, torch.compile, fake tensors) goes through it. Both paths give the same
numbers: the direct path runs the backend's own forward, which the custom op wraps."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastlm
from fastlm.ops import _eager
from fastlm.ops.attention import _op as attention_op
from fastlm.ops.attention_kvcache import _op as kvcache_op
from fastlm.ops.ffn import _op as ffn_op
from fastlm.ops.layer_norm import _op as layer_norm_op

BACKENDS = ["triton", "reference"]  # the custom-op backends (torch is native autograd)


def _cases():
    """(name, module, custom-op attribute, function of requires_grad returning the op's output)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 16), torch.randn(16), torch.randn(16)
    w1, b1, w2, b2 = torch.randn(24, 16), torch.randn(24), torch.randn(16, 24), torch.randn(16)
    q = torch.randn(2, 5, 2, 16)
    kc, lens = torch.randn(2, 8, 2, 16), torch.tensor([3, 5], dtype=torch.int32)

    def leaf(t, grad):
        return t.detach().clone().requires_grad_(grad)

    return [
        ("layer_norm", layer_norm_op, "layer_norm_fwd",
         lambda g, be: fastlm.layer_norm(leaf(x, g), w, b, residual=x, backend=be)[0]),
        ("linear_gelu", ffn_op, "linear_gelu_fwd",
         lambda g, be: fastlm.linear_gelu(leaf(x, g), w1, b1, backend=be)),
        ("gelu_ffn", ffn_op, "gelu_ffn_fwd",
         lambda g, be: fastlm.gelu_ffn(leaf(x, g), w1, b1, w2, b2, backend=be)),
        ("attention", attention_op, "attention_fwd",
         lambda g, be: fastlm.attention(leaf(q, g), q, q, causal=True, backend=be)),
        ("kvcache", kvcache_op, "attention_with_kvcache_op",
         lambda g, be: fastlm.attention_with_kvcache(q[:, :1], kc.clone(), kc.clone(), lens, backend=be)),
    ]  # fmt: skip


CASES = _cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_eager_without_grad_skips_the_custom_op(monkeypatch, case, backend):
    _, module, name, fn = case
    with_op = fn(False, backend)  # reference result through whichever path
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    direct = fn(False, backend)
    assert calls == [], f"{name} went through the custom op on an eager no-grad call"
    torch.testing.assert_close(direct, with_op, rtol=0, atol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "kvcache"], ids=lambda c: c[0])
def test_autograd_goes_through_the_custom_op(monkeypatch, case):
    _, module, name, fn = case
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    out = fn(True, "reference")
    assert calls, f"{name} skipped the custom op although autograd must record it"
    assert out.requires_grad


def test_direct_refuses_modes_subclasses_and_grad():
    x = torch.randn(2, 3)
    assert _eager.direct(x, None)
    assert not _eager.direct(x.requires_grad_())
    with torch.no_grad():
        assert _eager.direct(x)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2, 3))
        assert not _eager.direct(fake)
