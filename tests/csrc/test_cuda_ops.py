"""GPU parity of every CUDA C++ op against fastlm.reference (tolerance rule of
tests/parity.py), the public ops on backend="cuda" (linear_gelu, gelu_ffn,
attention_with_kvcache: outputs, every gradient, the appended cache), CUDA-graph
capture/replay, and a compute-sanitizer memcheck smoke test.
Skipped without a GPU; on a GPU the extension must build (JIT or AOT)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _cuda_ext
from fastlm.ops._checks import default_softmax_scale
from fastlm.reference import attention as ref_attn
from fastlm.reference import attention_kvcache as ref_kv
from fastlm.reference import ffn as ref_ffn
from tests.ops.test_attention_kvcache import CASES as KV_CPU_CASES
from tests.ops.test_attention_kvcache import _check as kv_check
from tests.ops.test_attention_kvcache import _oracle as kv_oracle
from tests.ops.test_ffn import FFN_CASES, LG_CASES, _ffn_check, _lg_check
from tests.parity import assert_parity

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
LOWP = [torch.float16, torch.bfloat16]
ALL = [torch.float32, *LOWP]


@pytest.fixture(scope="module")
def ext():
    reason = _cuda_ext.unavailable_reason()
    assert reason is None, f"the CUDA extension did not load on a GPU machine: {reason}"
    return _cuda_ext.module()


def _ids(d):
    return str(d).replace("torch.", "")


# ------------------------------------------------------------------ LayerNorm


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
@pytest.mark.parametrize(
    "shape", [(1, 384), (17, 1000), (3, 5, 768), (4, 4096), (2, 16384), (3, 1001)]
)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm(ext, dtype, shape, residual):
    n = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) if residual else None
    w = (1 + 0.1 * torch.randn(n, device="cuda", dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(n, device="cuda", dtype=dtype)).requires_grad_()
    out = fastlm.layer_norm(x, w, b, 1e-5, residual=r, backend="cuda")
    y, z = out if residual else (out, None)
    dy = torch.randn_like(y)
    dz = torch.randn_like(z) if residual else None
    loss = (y * dy).sum() + ((z * dz).sum() if residual else 0)
    grads = torch.autograd.grad(loss, [t for t in (x, r, w, b) if t is not None])

    leaves = [t.detach().double().requires_grad_() for t in (x, r, w, b) if t is not None]
    xd, rd = leaves[0], (leaves[1] if residual else None)
    wd, bd = leaves[-2], leaves[-1]
    zd = xd + rd if residual else xd
    if residual:  # the kernel rounds z to the activation dtype before the statistics
        zd = zd.to(dtype).double()
    yd = F.layer_norm(zd, (n,), wd, bd, 1e-5)
    loss_d = (yd * dy.double()).sum() + ((zd * dz.double()).sum() if residual else 0)
    grads_d = torch.autograd.grad(loss_d, leaves)

    base = F.layer_norm((x + r) if residual else x, (n,), w, b, 1e-5)
    assert_parity(y, yd, base.detach(), name="y")
    if residual:
        assert_parity(z, zd, (x + r).detach(), name="z")
    names = ("dx", "dr", "dw", "db") if residual else ("dx", "dw", "db")
    for name, g, gd in zip(names, grads, grads_d):
        # Parameter grads sum over rows: allow the fp32 accumulation error over M rows.
        atol = 1e-5 * math.sqrt(x.numel() // n) if name in ("dw", "db") else None
        assert_parity(g, gd, None, name=name, atol=atol if dtype == torch.float32 else None)


# ------------------------------------------------------------------ bias + GELU


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 7), (17, 1000), (3, 5, 3072)])
def test_bias_gelu_and_grad(ext, dtype, approximate, shape):
    n = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    y, h = ext.bias_gelu(x, b, approximate, store_preact=True)
    hd = x.double() + b.double()
    assert_parity(h, hd, x + b, name="h")
    assert_parity(
        y, ref_ffn.gelu(hd, approximate), F.gelu(x + b, approximate=approximate), name="y"
    )
    y2, none = ext.bias_gelu(x, None, approximate)
    assert none is None
    assert_parity(
        y2,
        ref_ffn.gelu(x.double(), approximate),
        F.gelu(x, approximate=approximate),
        name="y(no bias)",
    )
    dy = torch.randn_like(x)
    dh = ext.gelu_bwd(dy, h, approximate)
    hl = h.detach().clone().requires_grad_()
    (base,) = torch.autograd.grad(F.gelu(hl, approximate=approximate), hl, dy)
    assert_parity(dh, dy.double() * ref_ffn.gelu_grad(h.double(), approximate), base, name="dh")


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
def test_bias_residual_add(ext, dtype):
    x = torch.randn(17, 1000, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    b = torch.randn(1000, device="cuda", dtype=torch.float32)  # fp32 bias with low-p x
    y = ext.bias_residual_add(x, b, r)
    assert_parity(y, x.double() + b.double() + r.double(), (x + b.to(dtype)) + r, name="y")


# ------------------------------------------------------------------ attention


def _qkv(b, sq, sk, h, hkv, d, dtype):
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
    return q, k, v


def _check_attention(o, lse, q, k, v, causal, mask, name):
    od, lsed = ref_attn.attention(q.double(), k.double(), v.double(), causal, mask, return_lse=True)
    ob = ref_attn.attention(q, k, v, causal, mask, upcast=False)
    visible = torch.isfinite(lsed)  # rows with at least one key
    assert_parity(o, od, ob, name=f"{name} o")
    assert (o.transpose(1, 2)[~visible] == 0).all(), f"{name}: rows without keys must be 0"
    torch.testing.assert_close(lse[visible].double(), lsed[visible], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", LOWP, ids=_ids)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "b, sq, sk", [(1, 1, 1), (3, 17, 17), (2, 127, 257), (1, 257, 127), (1, 300, 1000)]
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_attention(ext, dtype, d, b, sq, sk, causal, masked):
    q, k, v = _qkv(b, sq, sk, 4, 2, d, dtype)
    mask = None
    if masked:
        mask = torch.rand(b, sk, device="cuda") > 0.3
        mask[0] = False  # a sequence with no visible key at all
    o, lse = ext.attention(q, k, v, mask, default_softmax_scale(q.shape[-1]), causal)
    _check_attention(o, lse, q, k, v, causal, mask, "dense")


@pytest.mark.parametrize("dtype", LOWP, ids=_ids)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_strided_inputs(ext, dtype, d, causal):
    qkv = torch.randn(2, 65, 3, 4, d, device="cuda", dtype=dtype)  # packed: no copies
    q, k, v = qkv.unbind(2)
    o, _ = ext.attention(q, k, v, None, 0.3, causal)
    od = ref_attn.attention(q.double(), k.double(), v.double(), causal, None, 0.3)
    assert_parity(o, od, ref_attn.attention(q, k, v, causal, None, 0.3, upcast=False), name="o")


@pytest.mark.parametrize("dtype", LOWP, ids=_ids)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_varlen(ext, dtype, d, causal):
    lq, lk = [1, 17, 130, 0], [5, 17, 129, 3]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q = torch.randn(sum(lq), 4, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lk), 1, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    o, lse = ext.attention_varlen(
        q, k, v, cu_q, cu_k, max(lq), max(lk), default_softmax_scale(q.shape[-1]), causal
    )
    for i in range(len(lq)):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if lq[i] == 0:
            continue
        _check_attention(
            o[qs][None],
            lse[:, qs][None],
            q[qs][None],
            k[ks][None],
            v[ks][None],
            causal,
            None,
            f"seq{i}",
        )


@pytest.mark.parametrize("dtype", LOWP, ids=_ids)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("cache_len", [300, 8192])
def test_attention_decode(ext, dtype, d, sq, cache_len):
    b, h, hkv = 3, 8, 2
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    kc = torch.randn(b, cache_len, hkv, d, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    seqlens = torch.tensor([cache_len, 1 + sq, cache_len // 3], device="cuda", dtype=torch.int32)
    for causal in (True, False):
        scale = default_softmax_scale(d)
        o, lse = ext.attention_decode(q, kc, vc, seqlens, scale, causal)
        od = ref_kv.kvcache_attention(q.double(), kc.double(), vc.double(), seqlens, causal, scale)
        ob = ref_kv.kvcache_attention(q.float(), kc.float(), vc.float(), seqlens, causal, scale)
        ob = ob.to(dtype)
        assert_parity(o, od, ob, name=f"decode causal={causal}")
        assert torch.isfinite(lse).all()


def test_attention_decode_empty_cache(ext):
    q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.float16)
    kc = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.float16)
    seqlens = torch.tensor([0, 5], device="cuda", dtype=torch.int32)
    o, lse = ext.attention_decode(q, kc, kc, seqlens, default_softmax_scale(q.shape[-1]), True)
    assert (o[0] == 0).all() and torch.isinf(lse[0]).all() and torch.isfinite(lse[1]).all()


# ------------------------------------------------------------------ public ops on the cuda backend
#
# fastlm.linear_gelu / gelu_ffn / attention_with_kvcache with backend="cuda", through the
# same checks as the CPU op tests (tests/ops): output and every gradient against the fp64
# reference with the parity rule, the cache contents after the append.


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
@pytest.mark.parametrize(
    "case", LG_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}-{c[3]}-b{c[4]}-{c[5]}"
)
def test_linear_gelu_cuda_backend(ext, dtype, case):
    _lg_check("cuda", *case, dtype, torch.device("cuda"))


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
@pytest.mark.parametrize(
    "case", FFN_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}->{c[3]}-{c[4]}-b{c[5]}-r{c[6]}-{c[7]}"
)
def test_gelu_ffn_cuda_backend(ext, dtype, case):
    _ffn_check("cuda", *case, dtype, torch.device("cuda"))


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
def test_linear_gelu_cuda_inference_and_expanded_grad(ext, dtype):
    """No grad: h is not stored; .sum().backward(): dy is expanded (strides (0, 0))."""
    x = torch.randn(33, 1000, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(77, 1000, device="cuda") * 0.03).to(dtype)
    b = torch.randn(77, device="cuda", dtype=dtype)
    with torch.no_grad():
        y = fastlm.linear_gelu(x, w, b, backend="cuda")
        yd = ref_ffn.linear_gelu(x.double(), w.double(), b.double())
        assert_parity(y, yd, F.gelu(F.linear(x, w, b)), name="y (no grad)")
    fastlm.linear_gelu(x, w, b, backend="cuda").sum().backward()
    xd = x.detach().double().requires_grad_()
    ref_ffn.linear_gelu(xd, w.double(), b.double()).sum().backward()
    xl = x.detach().clone().requires_grad_()
    F.gelu(F.linear(xl, w, b)).sum().backward()
    assert_parity(x.grad, xd.grad, xl.grad, name="dx (expanded dy)")


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
def test_ffn_cuda_backward_recomputes_missing_pre_activation(ext, dtype):
    from fastlm.ops.ffn import _op as ffn_op

    x = torch.randn(17, 64, device="cuda", dtype=dtype)
    w = (torch.randn(100, 64, device="cuda") * 0.125).to(dtype)
    b, dy = (
        torch.randn(100, device="cuda", dtype=dtype),
        torch.randn(17, 100, device="cuda").to(dtype),
    )
    missing = x.new_empty((0,))
    got = ffn_op.linear_gelu_bwd(dy, x, w, b, missing, "tanh", True, True, True, "cuda")
    want = ffn_op.linear_gelu_bwd(
        dy.double(),
        x.double(),
        w.double(),
        b.double(),
        missing.double(),
        "tanh",
        True,
        True,
        True,
        "reference",
    )
    for name, g, gw in zip(("dx", "dw", "db"), got, want):
        assert g.dtype == dtype
        # fp32: the row sums of db / dw accumulate M terms; low precision: one rounding of
        # dh plus the GEMM's.
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
        torch.testing.assert_close(g.double(), gw, **tol, msg=lambda m, n=name: f"{n}: {m}")


# head_dim 64 / 128 cases of the CPU suite (the CUDA kernel's head dims), plus a long cache
# whose keys the kernel splits over several blocks.
KV_CASES = {
    **{
        name: KV_CPU_CASES[name]
        for name in ("sq3-gqa4:2-hd64", "sq1-gqa4:1-hd128-noappend", "sq3-noncausal")
    },
    "sq1-mha-hd128-long": (3, 1, 4, 4, 128, 5000, [4999, 1, 2500], True, True),
    "sq5-gqa8:2-hd64-long": (2, 5, 8, 2, 64, 3000, [0, 2995], True, True),
}


@pytest.mark.parametrize("dtype", LOWP, ids=_ids)
@pytest.mark.parametrize("case", list(KV_CASES), ids=list(KV_CASES))
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided-cache"])
def test_attention_with_kvcache_cuda_backend(ext, dtype, case, strided):
    kv_check(KV_CASES[case], dtype, torch.device("cuda"), "cuda", strided=strided)


def test_attention_with_kvcache_cuda_out_of_range_gives_nan(ext):
    """Lengths the host does not check on CUDA: NaN rows, cache untouched, others exact."""
    from fastlm.ops.attention_kvcache._op import attention_with_kvcache_op

    dt = torch.float16
    q = torch.randn(3, 1, 4, 64, device="cuda", dtype=dt)
    kc = torch.randn(3, 40, 2, 64, device="cuda", dtype=dt)
    vc, new = torch.randn_like(kc), torch.randn(3, 1, 2, 64, device="cuda", dtype=dt)
    kc0, vc0 = kc.clone(), vc.clone()
    lens = torch.tensor([-1, 40, 7], device="cuda", dtype=torch.int32)  # bad, bad, ok
    out = attention_with_kvcache_op(q, kc, vc, lens, new, new, True, 0.125, "cuda")
    assert torch.isnan(out[:2]).all() and not torch.isnan(out[2]).any()
    torch.testing.assert_close(kc[:2], kc0[:2], rtol=0, atol=0)
    torch.testing.assert_close(vc[:2], vc0[:2], rtol=0, atol=0)
    good = lens[2:]
    oracle = kv_oracle(q[2:], kc0[2:], vc0[2:], good, new[2:], new[2:], True, 0.125)
    base = kv_oracle(q[2:], kc0[2:], vc0[2:], good, new[2:], new[2:], True, 0.125, upcast=False)
    assert_parity(out[2:], oracle, base, name="valid sequence")


def test_attention_with_kvcache_cuda_graph_decode_step(ext):
    """The cuda backend's decode step (torch-indexing append + split-KV kernel) has no host
    sync: it captures in a CUDA graph and replays with new lengths."""
    dt = torch.float16
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=dt)
    kc = torch.randn(2, 4096, 2, 128, device="cuda", dtype=dt)
    vc = torch.randn_like(kc)
    k, v = (
        torch.randn(2, 1, 2, 128, device="cuda", dtype=dt),
        torch.randn(2, 1, 2, 128, device="cuda", dtype=dt),
    )
    lens = torch.tensor([4000, 17], device="cuda", dtype=torch.int32)

    def step():
        return fastlm.attention_with_kvcache(q, kc, vc, lens, k=k, v=v, backend="cuda")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for t in (q, k, v):
        t.normal_()
    lens.copy_(torch.tensor([100, 3000], device="cuda", dtype=torch.int32))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step(), atol=0, rtol=0)
    torch.testing.assert_close(kc[0, 100], k[0, 0], atol=0, rtol=0)
    torch.testing.assert_close(vc[1, 3000], v[1, 0], atol=0, rtol=0)


# ------------------------------------------------------------------ bad input


def test_bad_input_messages(ext):
    q = torch.randn(1, 8, 2, 96, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head_dim must be one of 64, 128, got 96"):
        ext.attention(q, q, q, None, 0.125)
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ext.attention(q, q, q, None, 0.125)
    x = torch.randn(4, 20000, device="cuda")
    with pytest.raises(RuntimeError, match="hidden size must be in"):
        ext.layer_norm_fwd(x, None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="approximate must be 'none' or 'tanh'"):
        ext.bias_gelu(x[:, :8], None, "sigmoid")


# ------------------------------------------------------------------ CUDA graphs


def test_cuda_graph_capture_replay(ext):
    x = torch.randn(64, 1024, device="cuda", dtype=torch.float16)
    w = torch.randn(1024, device="cuda", dtype=torch.float16)
    q, k, v = _qkv(2, 130, 130, 4, 4, 64, torch.float16)
    kc = torch.randn(2, 4096, 4, 64, device="cuda", dtype=torch.float16)
    seqlens = torch.tensor([4000, 17], device="cuda", dtype=torch.int32)
    qd = q[:, :1].contiguous()
    run = lambda: (
        ext.layer_norm_fwd(x, None, w, None, 1e-5)[0],
        ext.attention(q, k, v, None, default_softmax_scale(q.shape[-1]), True)[0],
        ext.attention_decode(qd, kc, kc, seqlens, default_softmax_scale(qd.shape[-1]), True)[0],
    )
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run()
    for t in (x, q, qd, kc):
        t.normal_()
    seqlens.copy_(torch.tensor([100, 3000], device="cuda", dtype=torch.int32))
    g.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, run()):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# ------------------------------------------------------------------ compute-sanitizer

_SANITIZE = """
import torch, fastlm._cuda_ext as c
m = c.module()
x = torch.randn(5, 1001, device="cuda", dtype=torch.float16)
y, _, mean, rstd = m.layer_norm_fwd(x, x, None, None, 1e-5)
m.layer_norm_bwd(y, None, x, None, mean, rstd, False, False)
m.bias_gelu(x, None, "tanh", True)
xs = x[:, 1:]  # odd row stride, 2-byte offset: the unaligned (element-wise) path
b = torch.randn(1000, device="cuda")
_, h = m.bias_gelu(xs, b.half(), "none", True)
m.gelu_bwd(xs, h, "tanh")
m.bias_residual_add(xs, b, xs)
m.bias_residual_add(x, None, x)
q = torch.randn(2, 37, 2, 64, device="cuda", dtype=torch.float16)
m.attention(q, q, q, None, None, True)
kc = torch.randn(2, 600, 2, 64, device="cuda", dtype=torch.float16)
m.attention_decode(q[:, :1].contiguous(), kc, kc, torch.tensor([600, 3], device="cuda", dtype=torch.int32))
torch.cuda.synchronize()
"""


@pytest.mark.slow
def test_compute_sanitizer_memcheck(ext):
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer is not installed")
    r = subprocess.run(
        [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", _SANITIZE],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
