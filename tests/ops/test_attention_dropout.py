"""Dropout inside fastlm.attention / attention_varlen.

The Triton kernels draw their keep-mask from a counter-based RNG keyed by a seed taken
from torch's default generator; fastlm.ops.attention.dropout_mask materialises that mask
(and the reference backend's torch.rand mask), so the oracles can be given the identical
mask. Two oracles: fastlm.reference and a few lines of plain torch written here
(softmax, then keep / (1 - p)), so a scaling bug shared by kernel and reference shows.
The torch backend is SDPA's own dropout: checked for reproducibility and for its scaling
statistically, like every backend.
"""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.ops.attention import draw_seed, dropout_mask
from fastlm.reference import attention as ref
from tests.ops.test_attention import check_parity, grads, make_inputs, sdpa
from tests.ops.test_attention_varlen import packed

P = 0.3
BACKENDS = ["triton", "torch", "reference"]


def _seed_of_next_call(torch_seed: int) -> torch.Tensor:
    """The dropout seed a call draws right after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return draw_seed()


def dropout_oracle(q, k, v, causal, key_padding_mask, keep, p):
    """O = (softmax(S) * keep / (1 - p)) v on (B, S, H, D), rows with no key = 0; the
    causal mask bottom-right aligned (tril with offset Sk - Sq). Independent of fastlm."""
    sq, sk, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    allowed = allowed.tril(sk - sq) if causal else allowed
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    empty = ~allowed.any(-1, keepdim=True)  # rows with no key: P = 0 (no NaN, no gradient)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(s, -1).masked_fill(empty, 0.0)
    return torch.einsum("bhij,bjhd->bihd", probs * keep / (1 - p), v)


def _oracles(causal, mask, keep):
    def with_ref(q, k, v):
        return ref.attention(q, k, v, causal, mask, None, keep, P)

    def with_plain(q, k, v):
        return dropout_oracle(q, k, v, causal, mask, keep, P)

    return {"reference": with_ref, "plain torch": with_plain}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize(
    "b, sq, sk, h, hkv, d, causal, pad",
    [(2, 17, 33, 4, 2, 32, True, True), (1, 40, 17, 2, 1, 64, False, False)],
    ids=["gqa-causal-pad", "mqa-sq>sk"],
)
def test_matches_oracles_with_the_backends_mask(
    backend, b, sq, sk, h, hkv, d, causal, pad, dtype, device
):
    q, k, v, mask = make_inputs(b, sq, sk, h, hkv, d, dtype, device, pad)
    seed = _seed_of_next_call(7)
    keep = dropout_mask(seed, b, h, sq, sk, P, device, backend=backend)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    out = fastlm.attention(
        *inputs, causal=causal, key_padding_mask=mask, dropout_p=P, backend=backend
    )
    dout = torch.randn_like(out)
    oracles = _oracles(causal, mask, keep)
    # Baseline: PyTorch in the low dtype (the plain-torch oracle; SDPA cannot take a mask).
    check_parity(out, grads(out, inputs, dout), inputs, dout, oracles, oracles["plain torch"])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_varlen_matches_oracles_with_the_backends_mask(backend, device):
    lq, lk, h = [5, 1, 20], [9, 3, 20], 2
    q, k, v, cu_q, cu_k = packed(lq, lk, h, 1, 32, torch.float32, device)
    keep = dropout_mask(_seed_of_next_call(3), len(lq), h, max(lq), max(lk), P, device, backend=backend)  # fmt: skip
    inputs = [t.requires_grad_() for t in (q, k, v)]
    torch.manual_seed(3)
    out = fastlm.attention_varlen(
        *inputs, cu_q, cu_k, max(lq), max(lk), causal=True, dropout_p=P, backend=backend
    )
    spans = list(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:]))

    def with_plain(q, k, v):  # sequence b uses the top-left corner of keep[b]
        return torch.cat([
            dropout_oracle(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], True, None,
                           keep[b : b + 1, :, : q1 - q0, : k1 - k0], P)[0]
            for b, (q0, q1, k0, k1) in enumerate(spans)
        ])  # fmt: skip

    def with_ref(q, k, v):
        return ref.attention_varlen(q, k, v, cu_q, cu_k, True, None, keep, P)

    dout = torch.randn_like(out)
    oracles = {"reference": with_ref, "plain torch": with_plain}
    check_parity(out, grads(out, inputs, dout), inputs, dout, oracles, with_plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_for_a_fixed_seed(backend, device):
    q, k, v, _ = make_inputs(1, 17, 17, 2, 2, 32, torch.float32, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    runs = []
    for torch_seed in (11, 11, 12):
        torch.manual_seed(torch_seed)
        out = fastlm.attention(*inputs, dropout_p=P, backend=backend)
        torch.manual_seed(torch_seed + 100)  # the backward must not draw a new mask
        runs.append((out, *grads(out, inputs, torch.ones_like(out))))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_probabilities_are_scaled(backend, device):
    """With q = k = 0 every allowed key has P = 1/Sk and v = 1 makes each output the kept
    fraction / (1 - p): its mean over many rows is 1 (5 standard deviations), not 1 - p."""
    b, s, h, d, p = 1, 64, 2, 16, 0.3
    q = torch.zeros(b, s, h, d, device=device)
    v = torch.ones(b, s, h, d, device=device)
    out = fastlm.attention(q, q, v, dropout_p=p, backend=backend)
    n = b * s * h * s  # Bernoulli draws behind the mean
    assert abs(out.mean().item() - 1.0) < 5 * (p / (1 - p) / n) ** 0.5
    assert torch.allclose(out, out[..., :1].expand_as(out))  # one value per row


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dropout_equals_no_dropout(backend, device):
    q, k, v, mask = make_inputs(2, 17, 17, 2, 2, 32, torch.float32, device, pad=True)
    a = fastlm.attention(q, k, v, key_padding_mask=mask, backend=backend)
    b = fastlm.attention(q, k, v, key_padding_mask=mask, dropout_p=0.0, backend=backend)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, sdpa(q, k, v, False, mask))


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_mask_statistics(backend, p, device):
    keep = dropout_mask(1234, 2, 3, 64, 80, p, device, backend=backend)
    assert keep.shape == (2, 3, 64, 80) and keep.dtype == torch.bool
    n = keep.numel()
    # Binomial: 5 standard deviations around 1 - p.
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    # Heads and rows are not copies of each other.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    # A pure function of the seed.
    assert torch.equal(keep, dropout_mask(1234, 2, 3, 64, 80, p, device, backend=backend))
    assert not torch.equal(keep, dropout_mask(1235, 2, 3, 64, 80, p, device, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_dropout_mask_bad_backend(backend, device):
    with pytest.raises(ValueError, match=f"one of \\('triton', 'reference'\\), got '{backend}'"):
        dropout_mask(1, 1, 1, 4, 4, 0.5, device, backend=backend)


def test_compile_fullgraph_torch_backend_with_dropout(device):
    q, k, v, _ = make_inputs(1, 9, 9, 2, 2, 16, torch.float32, device)

    def f(q, k, v):
        return fastlm.attention(q, k, v, causal=True, dropout_p=P, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = compiled(*inputs)
    assert torch.isfinite(out).all()
    dq, dk, dv = grads(out, inputs, torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv)) and dv.abs().sum() > 0
    # Some probabilities were dropped: the output differs from the no-dropout one.
    assert not torch.allclose(out, fastlm.attention(q, k, v, causal=True, backend="torch"))
