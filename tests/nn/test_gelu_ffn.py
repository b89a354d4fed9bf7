"""fastlm.nn.GeluFFN: parameters, state_dict, parameter sharing, and parity with Hugging Face
BERT (intermediate + output.dense) and GPT-2 (MLP with Conv1D weights) sublayers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlm.nn import GeluFFN
from fastlm.reference import ffn as ref

BACKENDS = ["triton", "torch"]


def _assert_fp32_close(actual, expected):
    # fp32 GEMMs (K <= 64) against fp32 PyTorch: assert_close's fp32 defaults.
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1.3e-6)


def test_parameters_and_state_dict():
    ffn = GeluFFN(16, 64, approximate="tanh")
    assert list(ffn.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert ffn.fc1.weight.shape == (64, 16) and ffn.fc2.weight.shape == (16, 64)
    assert "approximate='tanh'" in repr(ffn)
    no_bias = GeluFFN(16, 64, bias=False)
    assert list(no_bias.state_dict()) == ["fc1.weight", "fc2.weight"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_matches_torch(backend, bias):
    ffn = GeluFFN(24, 40, approximate="none", bias=bias, backend=backend)
    x = torch.randn(2, 5, 24, requires_grad=True)
    r = torch.randn(2, 5, 24, requires_grad=True)
    out = ffn(x, r)
    expected = ffn.fc2(F.gelu(ffn.fc1(x))) + r
    _assert_fp32_close(out, expected)
    params = [x, r, *ffn.parameters()]
    dy = torch.randn_like(out)
    for g, e in zip(
        torch.autograd.grad(out, params, dy), torch.autograd.grad(expected, params, dy)
    ):
        _assert_fp32_close(g, e)


def test_from_linears_shares_parameters():
    l1, l2 = nn.Linear(8, 32), nn.Linear(32, 8)
    ffn = GeluFFN.from_linears(l1, l2, approximate="tanh", backend="torch")
    assert ffn.fc1.weight is l1.weight and ffn.fc2.bias is l2.bias
    x = torch.randn(3, 8)
    ffn(x).sum().backward()
    assert l1.weight.grad is not None and l2.bias.grad is not None
    _assert_fp32_close(ffn(x), ref.gelu_ffn(x, l1.weight, l1.bias, l2.weight, l2.bias, "tanh"))


def test_bad_arguments():
    with pytest.raises(
        ValueError, match=r"approximate must be one of \('none', 'tanh'\), got 'erf'"
    ):
        GeluFFN(8, 16, approximate="erf")
    with pytest.raises(
        TypeError, match=r"fc1 must be a torch.nn.Linear or a transformers Conv1D, got ReLU"
    ):
        GeluFFN.from_linears(nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"fc2 takes 12 input features but fc1 gives 16"):
        GeluFFN.from_linears(nn.Linear(8, 16), nn.Linear(12, 8))


# ------------------------------------------------------------------ Hugging Face sublayers


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_bert_intermediate_output(backend):
    bert = pytest.importorskip("transformers.models.bert.modeling_bert")
    from transformers import BertConfig

    cfg = BertConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1
    )
    inter, output = bert.BertIntermediate(cfg).eval(), bert.BertOutput(cfg).eval()
    ffn = GeluFFN.from_linears(inter.dense, output.dense, approximate="none", backend=backend)
    x = torch.randn(2, 7, 32, requires_grad=True)
    # BertOutput is LayerNorm(dense(h) + input_tensor): the fused residual gives its LN input.
    z = ffn(x, residual=x)
    expected = output.dense(inter(x)) + x
    _assert_fp32_close(z, expected)
    _assert_fp32_close(output.LayerNorm(z), output(inter(x), x))
    params = [x, inter.dense.weight, inter.dense.bias, output.dense.weight, output.dense.bias]
    dy = torch.randn_like(z)
    for g, e in zip(torch.autograd.grad(z, params, dy), torch.autograd.grad(expected, params, dy)):
        _assert_fp32_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_gpt2_mlp_conv1d(backend):
    gpt2 = pytest.importorskip("transformers.models.gpt2.modeling_gpt2")
    from transformers import GPT2Config

    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2)
    mlp = gpt2.GPT2MLP(4 * 32, cfg).eval()
    # Conv1D stores (in, out) weights: GeluFFN reads their transposed views in place.
    ffn = GeluFFN.from_linears(mlp.c_fc, mlp.c_proj, approximate="tanh", backend=backend)
    assert ffn.fc1 is mlp.c_fc
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = ffn(x)
    expected = mlp(x)
    _assert_fp32_close(y, expected)
    params = [x, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias]
    dy = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(expected, params, dy)):
        assert g.shape == e.shape
        _assert_fp32_close(g, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_half_ffn_given_fp32_input_computes_in_fp32(dtype, residual):
    """A half-precision GeluFFN inside a layer computed in fp32 (fastlm.ops.linear's
    widens_layer, on CPU) takes an fp32 x: the fp32 FFN over its exactly widened weights,
    the same bits, with each gradient in its parameter's own dtype."""
    torch.manual_seed(0)
    half = GeluFFN(24, 40).to(dtype)
    wide = copy.deepcopy(half).float()
    x = torch.randn(3, 5, 24, requires_grad=True)
    r = torch.randn(3, 5, 24) if residual else None
    got = half(x, residual=r)
    want = wide(x, residual=r)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g, retain_graph=True)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(gx, torch.autograd.grad(wide(x, residual=r), x, g)[0])
    for p, q in zip(half.parameters(), wide.parameters()):
        assert p.grad.dtype == dtype and torch.equal(p.grad, q.grad.to(dtype))
