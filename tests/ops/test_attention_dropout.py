"""Dropout inside fastlm.attention / attention_varlen.

The Triton kernels draw their keep-mask from a counter-based RNG keyed by a seed taken
from torch's default generator; fastlm.ops.attention.dropout_mask materialises that mask
with the kernels' own RNG function, so the reference can be given the identical mask.
"""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.ops import attention as A
from fastlm.reference import attention as ref
from tests.ops.test_attention import check_against_reference, grads, make_inputs
from tests.ops.test_attention_varlen import packed

P = 0.3


def _seed_of_next_call(torch_seed: int) -> torch.Tensor:
    """The dropout seed a call draws right after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return A.draw_seed()


@pytest.mark.parametrize(
    "b, sq, sk, h, hkv, d, causal, pad",
    [(2, 17, 33, 4, 2, 32, True, True), (1, 40, 17, 2, 1, 64, False, False)],
    ids=["gqa-causal-pad", "mqa-sq>sk"],
)
def test_triton_matches_reference_with_kernel_mask(
    b, sq, sk, h, hkv, d, causal, pad, dtype, device
):
    q, k, v, mask = make_inputs(b, sq, sk, h, hkv, d, dtype, device, pad)
    keep = A.dropout_mask(_seed_of_next_call(7), b, h, sq, sk, P, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    out = fastlm.attention(
        *inputs, causal=causal, key_padding_mask=mask, dropout_p=P, backend="triton"
    )
    dout = torch.randn_like(out)
    check_against_reference(
        out, grads(out, inputs, dout), inputs, dout,
        lambda q, k, v, upcast: ref.attention(q, k, v, causal, mask, None, keep, P, upcast=upcast),
    )  # fmt: skip


def test_varlen_matches_reference_with_kernel_mask(device):
    lq, lk, h = [5, 1, 20], [9, 3, 20], 2
    q, k, v, cu_q, cu_k = packed(lq, lk, h, 1, 32, torch.float32, device)
    keep = A.dropout_mask(_seed_of_next_call(3), len(lq), h, max(lq), max(lk), P, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    torch.manual_seed(3)
    out = fastlm.attention_varlen(
        *inputs, cu_q, cu_k, max(lq), max(lk), causal=True, dropout_p=P, backend="triton"
    )
    dout = torch.randn_like(out)
    check_against_reference(
        out, grads(out, inputs, dout), inputs, dout,
        lambda q, k, v, upcast: ref.attention_varlen(q, k, v, cu_q, cu_k, True, None, keep, P, upcast=upcast),
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_reproducible_for_a_fixed_seed(backend, device):
    q, k, v, _ = make_inputs(1, 17, 17, 2, 2, 32, torch.float32, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    runs = []
    for torch_seed in (11, 11, 12):
        torch.manual_seed(torch_seed)
        out = fastlm.attention(*inputs, dropout_p=P, backend=backend)
        runs.append((out, *grads(out, inputs, torch.ones_like(out))))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_dropout_equals_no_dropout(backend, device):
    q, k, v, mask = make_inputs(2, 17, 17, 2, 2, 32, torch.float32, device, pad=True)
    a = fastlm.attention(q, k, v, key_padding_mask=mask, backend=backend)
    b = fastlm.attention(q, k, v, key_padding_mask=mask, dropout_p=0.0, backend=backend)
    assert torch.equal(a, b)


def test_torch_backend_matches_reference_with_its_mask(device):
    b, s, h, d = 2, 9, 2, 16
    q, k, v, mask = make_inputs(b, s, s, h, h, d, torch.float32, device, pad=True)
    keep = A.dropout_mask(_seed_of_next_call(5), b, h, s, s, P, device, backend="torch")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    out = fastlm.attention(
        *inputs, causal=True, key_padding_mask=mask, dropout_p=P, backend="torch"
    )
    dout = torch.randn_like(out)
    check_against_reference(
        out, grads(out, inputs, dout), inputs, dout,
        lambda q, k, v, upcast: ref.attention(q, k, v, True, mask, None, keep, P, upcast=upcast),
    )  # fmt: skip


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_mask_statistics(p, device):
    keep = A.dropout_mask(1234, 2, 3, 64, 80, p, device)
    assert keep.shape == (2, 3, 64, 80) and keep.dtype == torch.bool
    n = keep.numel()
    # Binomial: 5 standard deviations around 1 - p.
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    # Counters differ per (b, h, i, j): heads and rows are not copies of each other.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    # A pure function of the seed.
    assert torch.equal(keep, A.dropout_mask(1234, 2, 3, 64, 80, p, device))
    assert not torch.equal(keep, A.dropout_mask(1235, 2, 3, 64, 80, p, device))


def test_dropout_mask_bad_backend(device):
    with pytest.raises(ValueError, match="backend must be 'triton' or 'torch', got 'cuda'"):
        A.dropout_mask(1, 1, 1, 4, 4, 0.5, device, backend="cuda")


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
