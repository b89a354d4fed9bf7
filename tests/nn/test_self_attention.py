"""fastlm.nn.SelfAttention: against PyTorch's SDPA and the transformers attention layers it
wraps, padded and packed inputs, dropout only in training, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm.nn as fnn
from fastlm.ops.padding import unpad_input

BACKENDS = ["triton", "torch"]
E, H = 64, 4  # head_dim 16: the smallest the Triton kernels take


def _sdpa_oracle(module: fnn.SelfAttention, x, key_padding_mask=None):
    """The same projections by hand and F.scaled_dot_product_attention (math, fp64)."""
    xd = x.double()
    w, b = module.qkv.weight.double(), module.qkv.bias.double()
    q, k, v = F.linear(xd, w, b).view(*x.shape[:2], 3, H, E // H).unbind(2)
    sq = sk = x.shape[1]
    mask = None
    if module.causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=x.device).tril()
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        mask = keep if mask is None else mask & keep
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
    a = a.transpose(1, 2).reshape(*x.shape[:2], E)
    return F.linear(a, module.out_proj.weight.double(), module.out_proj.bias.double())


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_matches_sdpa(backend, causal, device):
    module = fnn.SelfAttention(E, H, causal=causal, backend=backend).to(device)
    x = torch.randn(3, 9, E, device=device)
    mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    mask[1, 6:] = False
    mask[2, 2:] = False
    got = module(x, mask)
    ref = _sdpa_oracle(module, x, mask)
    valid = mask  # padded query rows are not part of the contract
    torch.testing.assert_close(got[valid].double(), ref[valid], atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(got[valid].sum(), [module.qkv.weight, module.out_proj.bias])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_padded(backend, device):
    module = fnn.SelfAttention(E, H, backend=backend).to(device)
    x = torch.randn(3, 7, E, device=device)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], device=device).bool()
    packed, indices, cu, longest = unpad_input(x, mask)
    got = module(packed, cu_seqlens=cu, max_seqlen=longest)
    ref = module(x, mask).flatten(0, 1)[indices]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_scale_and_dropout_reach_the_op(device):
    module = fnn.SelfAttention(E, H, dropout=0.5, softmax_scale=0.05, backend="torch").to(device)
    x = torch.randn(2, 5, E, device=device)
    module.eval()
    torch.testing.assert_close(module(x), module(x))  # eval: no dropout
    scaled = _sdpa_oracle(module, x * 1.0, None)  # oracle uses the default scale 1/sqrt(16)
    assert not torch.allclose(module(x).double(), scaled, atol=1e-4)
    module.softmax_scale = (E // H) ** -0.5
    torch.testing.assert_close(module(x).double(), scaled, atol=2e-5, rtol=1e-4)
    module.train()
    assert not torch.allclose(module(x), module(x))  # training: fresh dropout masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_hf_bert_shares_parameters_and_matches(backend):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertAttention

    cfg = transformers.BertConfig(
        hidden_size=E, num_attention_heads=H, attention_probs_dropout_prob=0.0
    )
    cfg._attn_implementation = "eager"
    hf = BertAttention(cfg).eval()
    sa = hf.self
    mine = fnn.SelfAttention.from_linears(
        (sa.query, sa.key, sa.value), hf.output.dense, H, backend=backend
    )
    assert mine.query.weight is sa.query.weight and mine.out_proj.weight is hf.output.dense.weight
    assert set(mine.state_dict()) == {
        f"{n}.{p}" for n in ("query", "key", "value", "out_proj") for p in ("weight", "bias")
    }
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        ctx, _ = sa(x)
        ref = hf.output.dense(ctx)
        got = mine(x)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_hf_gpt2_conv1d_matches(backend):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    cfg = transformers.GPT2Config(n_embd=E, n_head=H, attn_pdrop=0.0, resid_pdrop=0.0)
    cfg._attn_implementation = "sdpa"  # its eager path leaves causality to a mask from the model
    hf = GPT2Attention(cfg, layer_idx=0).eval()
    mine = fnn.SelfAttention.from_linears(hf.c_attn, hf.c_proj, H, causal=True, backend=backend)
    assert mine.qkv is hf.c_attn
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        ref, _ = hf(x)
        got = mine(x)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


BAD = [
    (
        "width",
        lambda m: m(torch.randn(2, 3, E + 1)),
        ValueError,
        r"\(batch, seq, embed_dim\) with embed_dim 64",
    ),
    (
        "packed-2d-without-cu",
        lambda m: m(torch.randn(5, E)),
        ValueError,
        r"\(batch, seq, embed_dim\)",
    ),
    (
        "mask-and-cu",
        lambda m: m(
            torch.randn(5, E),
            torch.ones(1, 5, dtype=torch.bool),
            cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
            max_seqlen=5,
        ),
        ValueError,
        "not both",
    ),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call(fnn.SelfAttention(E, H, backend="torch"))


def test_bad_construction():
    with pytest.raises(
        ValueError, match=r"embed_dim \(30\) must be a positive multiple of num_heads \(4\)"
    ):
        fnn.SelfAttention(30, 4)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fnn.SelfAttention(E, H, dropout=1.0)
    lin = torch.nn.Linear(E, E)
    with pytest.raises(ValueError, match=r"qkv must map 64 -> 192 features, got 64 -> 64"):
        fnn.SelfAttention.from_linears(lin, lin, H)
    with pytest.raises(ValueError, match="qkv must be one module or"):
        fnn.SelfAttention.from_linears((lin, lin), lin, H)
    with pytest.raises(TypeError, match=r"out_proj must be a torch\.nn\.Linear"):
        fnn.SelfAttention.from_linears(lin, torch.nn.Identity(), H)
