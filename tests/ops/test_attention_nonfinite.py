"""NaN and inf in the inputs of fastlm.attention / attention_varlen: each backend does
what the table in fastlm.ops.attention's docstring says.

The reference and triton backends confine a non-finite key to the queries that may see
it and a NaN query row to itself. The torch backend does the same where SDPA applies the
causal mask itself or needs none; where it hands SDPA a boolean mask, a hidden NaN key
turns every query it is hidden from into NaN (SDPA adds -inf to the NaN score), and where
it hands SDPA no mask, a NaN query row comes out as zeros. Rows untouched by the poison
are compared with SDPA math in fp64 on the same inputs with the poison replaced by zero.
What the torch backend gives in the poisoned rows is pinned on CPU only: on CUDA it is
whatever SDPA's CUDA kernels give (documented so).
"""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.ops.attention import _length_groups
from tests.ops.test_attention import sdpa, sdpa_varlen
from tests.parity import assert_parity

BACKENDS = ["triton", "torch", "reference"]
ON_CPU = not torch.cuda.is_available()
POISONS = {"nan": float("nan"), "inf": float("inf")}

# (Sq, Sk, causal, pad key, hidden key, torch route). Sequence 0's key `hidden` holds the
# poison; with `pad key` it is padded out (key_padding_mask False) as well. The route is
# how the torch backend calls SDPA: "mask" (a boolean attn_mask) or "sdpa" (is_causal, or
# no mask at all).
HIDDEN_KEY = {
    "padded": (4, 6, False, True, 3, "mask"),
    "causal-sq-lt-sk": (3, 6, True, False, 5, "mask"),  # hidden from queries 0 and 1
    "causal-padding": (5, 5, True, True, 4, "mask"),
    "causal-sq-eq-sk": (5, 5, True, False, 4, "sdpa"),  # seen by query 4 only
}


def _sees(sq, sk, causal, padded, key):
    """(Sq,) bool: which of sequence 0's queries may see ``key``."""
    i = torch.arange(sq)
    if padded:
        return torch.zeros(sq, dtype=torch.bool)
    return key <= i + (sk - sq) if causal else torch.ones(sq, dtype=torch.bool)


def _want(q, k, v, **kw):
    """SDPA math in fp64 with the poison replaced by zero (rows that never see it are
    unaffected by that replacement), in the input dtype's baseline too."""
    clean = [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k, v)]
    want = sdpa(*(t.double() for t in clean), **kw)
    return want, sdpa(*clean, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("case", list(HIDDEN_KEY))
def test_hidden_nonfinite_key(case, poison, dtype, device, backend):
    sq, sk, causal, padded, key, route = HIDDEN_KEY[case]
    b, h, hkv, d = 2, 4, 2, 16
    q = torch.randn(b, sq, h, d, device=device).to(dtype)
    k = torch.randn(b, sk, hkv, d, device=device).to(dtype)
    v = torch.randn(b, sk, hkv, d, device=device).to(dtype)
    k[0, key] = POISONS[poison]
    mask = None
    if padded:
        mask = torch.ones(b, sk, dtype=torch.bool, device=device)
        mask[0, key] = False
    out = fastlm.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    want, base = _want(q, k, v, causal=causal, key_padding_mask=mask)

    sees = _sees(sq, sk, causal, padded, key).to(device)
    # A query that sees a NaN or inf key (mixed-sign scores) gets NaN on every backend.
    assert torch.isnan(out[0, sees]).all()
    # Sequence 1 never holds the poison.
    assert_parity(out[1], want[1], base[1], name="the other sequence")
    hidden = out[0, ~sees]
    if backend == "torch" and not ON_CPU:
        pass  # whatever SDPA's CUDA kernels give (documented)
    elif backend == "torch" and route == "mask":
        assert torch.isnan(hidden).all(), "documented: NaN through SDPA's boolean mask"
    else:
        assert_parity(hidden, want[0, ~sees], base[0, ~sees], name="queries it is hidden from")


# (causal, key_padding_mask) -> the torch route: a boolean mask for padding or Sq != Sk.
QUERY_ROUTES = {
    "no-mask": (False, False, "sdpa"),
    "causal": (True, False, "sdpa"),
    "padding": (False, True, "mask"),
    "causal-padding": (True, True, "mask"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(QUERY_ROUTES))
def test_nan_query_row(case, dtype, device, backend):
    causal, padded, route = QUERY_ROUTES[case]
    b, s, h, d = 2, 5, 2, 16
    q, k, v = (torch.randn(b, s, h, d, device=device).to(dtype) for _ in range(3))
    q[0, 2, 1, 3] = float("nan")  # one element of query 2, head 1
    mask = torch.ones(b, s, dtype=torch.bool, device=device) if padded else None
    out = fastlm.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    want, base = _want(q, k, v, causal=causal, key_padding_mask=mask)

    row = out[0, 2, 1]
    if backend == "torch" and not ON_CPU:
        pass  # whatever SDPA's CUDA kernels give (documented)
    elif backend == "torch" and route == "sdpa":
        assert torch.equal(row, torch.zeros_like(row)), "documented: zeros without a mask"
    else:
        assert torch.isnan(row).all()
    others = torch.ones(b, s, h, dtype=torch.bool, device=device)
    others[0, 2, 1] = False
    assert_parity(out[others], want[others], base[others], name="every other row")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_hidden_key_and_nan_query(dtype, device, backend, monkeypatch):
    """Packed, causal: sequence 0 has Sq < Sk (a boolean mask on the torch backend's CPU
    route), sequence 1 Sq == Sk (is_causal). Each holds a NaN key hidden from its first
    query, and sequence 1 a NaN query row. The torch backend's CPU route runs each
    sequence in its own call here (a call of no cost to its length grouping); grouped with
    others of unequal length a sequence takes the boolean-mask route."""
    monkeypatch.setattr(_length_groups, "CALL_COST", 0)
    h, d = 2, 16  # lengths: q 2 and 3, k 4 and 3
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, 7], dtype=torch.int32, device=device)
    q = torch.randn(5, h, d, device=device).to(dtype)
    k, v = (torch.randn(7, h, d, device=device).to(dtype) for _ in range(2))
    k[3] = float("nan")  # sequence 0's last key: seen by its query 1 only
    k[6] = float("nan")  # sequence 1's last key: seen by its query 2 only
    q[3] = float("nan")  # sequence 1's query 1
    out = fastlm.attention_varlen(q, k, v, cu_q, cu_k, 3, 4, causal=True, backend=backend)
    clean = [torch.nan_to_num(t, nan=0.0) for t in (q, k, v)]
    want = sdpa_varlen(*(t.double() for t in clean), cu_q, cu_k, causal=True)
    base = sdpa_varlen(*clean, cu_q, cu_k, causal=True)

    assert torch.isnan(out[[1, 4]]).all()  # the queries that see a NaN key
    if backend == "torch" and not ON_CPU:
        return  # one masked SDPA call on CUDA: whatever its kernels give (documented)
    nan_query, hidden_in_masked = out[3], out[0]
    if backend == "torch":
        # On CPU sequence 0 (Sq < Sk) gets a boolean mask, sequence 1 (Sq == Sk) is_causal.
        assert torch.isnan(hidden_in_masked).all(), "documented: NaN through the mask"
        assert torch.equal(nan_query, torch.zeros_like(nan_query)), "documented: zeros"
    else:
        assert_parity(hidden_in_masked, want[0], base[0], name="sequence 0, query 0")
        assert torch.isnan(nan_query).all()
    assert_parity(out[2], want[2], base[2], name="sequence 1, query 0")
