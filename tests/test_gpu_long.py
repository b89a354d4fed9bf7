"""The long attention case of the GPU check: S = 4096, head_dim 128 (GPU only).

The op tests stop at sequence 257 (the interpreter pays per element); the flash kernels'
loops over many key blocks, the causal diagonal far from the first block and fp32 statistics
over 4096 keys are only exercised here. Forward and every gradient against fp64 SDPA math by
the parity rule (fastlm.parity), with PyTorch's own SDPA math in the low dtype as baseline.
Uses only public API: fastlm.attention and torch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.parity import assert_parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, S, H, D = 1, 4096, 2, 128


def _sdpa_math(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
    return out.transpose(1, 2)


def _forward_and_grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, dout)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_long_attention_parity(backend, dtype, causal):
    if backend == "cuda" and "cuda" not in fastlm.available_backends():
        pytest.skip("the CUDA C++ backend is not available here")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", generator=gen).to(dtype) for _ in range(3))
    dout = torch.randn(B, S, H, D, device="cuda", generator=gen).to(dtype)
    oracle = _forward_and_grads(
        lambda q, k, v: _sdpa_math(q, k, v, causal),
        [t.double() for t in (q, k, v)],
        dout.double(),
    )
    baseline = _forward_and_grads(lambda q, k, v: _sdpa_math(q, k, v, causal), [q, k, v], dout)
    actual = _forward_and_grads(
        lambda q, k, v: fastlm.attention(q, k, v, causal=causal, backend=backend), [q, k, v], dout
    )
    for name, a, o, b in zip(("out", "dq", "dk", "dv"), actual, oracle, baseline):
        assert_parity(a, o, b, name=name)
