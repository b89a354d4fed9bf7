"""The ops' fast acceptance of the usual call (``_plainly_valid``) must never accept what
the full validation (``_validate``) would reject: over a zoo of good and bad arguments,
whenever the fast check says yes, every check passes too. (It may say no to valid calls:
those just take the full path.)"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.ops.layer_norm import call as layer_norm_call

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]


@st.composite
def _tensor_or_junk(draw, n):
    kind = draw(st.sampled_from(["none", "ok", "shape", "dtype", "strided", "device", "junk"]))
    if kind == "none":
        return None
    if kind == "junk":
        return draw(st.sampled_from([1.0, [1.0] * n, "x"]))
    size = n if kind != "shape" else n + draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES)) if kind == "dtype" else torch.float32
    if kind == "strided":
        return torch.zeros(size, 2, dtype=dtype)[:, 0]
    device = "meta" if kind == "device" else "cpu"
    return torch.zeros(size, dtype=dtype, device=device)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_layer_norm_fast_check_implies_full_check(data):
    n = data.draw(st.integers(1, 6))
    rows = data.draw(st.integers(1, 3))
    x_dtype = data.draw(st.sampled_from(DTYPES))
    x = torch.zeros(rows, n, dtype=x_dtype)
    if data.draw(st.booleans()):
        x = torch.zeros(n, rows, dtype=x_dtype).t()  # a strided last dim
    weight, bias = data.draw(_tensor_or_junk(n)), data.draw(_tensor_or_junk(n))
    residual = data.draw(st.sampled_from([None, "same", "other-dtype", "other-shape"]))
    residual = {
        None: None,
        "same": torch.zeros_like(x),
        "other-dtype": torch.zeros(x.shape, dtype=torch.float16),
        "other-shape": torch.zeros(rows, n + 1, dtype=x_dtype),
    }[residual]
    eps = data.draw(st.sampled_from([1e-5, 0.0, -1.0, 1, True, float("nan"), None]))
    if layer_norm_call._plainly_valid(x, weight, bias, eps, residual):
        layer_norm_call._validate(x, weight, bias, eps, residual)  # must not raise


def test_layer_norm_fast_check_accepts_the_usual_call():
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    assert layer_norm_call._plainly_valid(x, w, b, 1e-5, None)
    assert layer_norm_call._plainly_valid(x, w, b, 1e-12, torch.randn(4, 8))
