"""The ops' fast acceptance of the usual call (``_plainly_valid``) must never accept what
the full validation (``_validate``) would reject: over a zoo of good and bad arguments,
whenever the fast check says yes, every check passes too. (It may say no to valid calls:
those just take the full path.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.ops.attention import call as attention_call
from fastlm.ops.attention_kvcache import call as kvcache_call
from fastlm.ops.ffn import call as ffn_call
from fastlm.ops.layer_norm import call as layer_norm_call

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]


@st.composite
def _tensor_or_junk(draw, n):
    kind = draw(
        st.sampled_from(["none", "ok", "param", "shape", "dtype", "strided", "device", "junk"])
    )
    if kind == "none":
        return None
    if kind == "param":  # a module's weight
        return torch.nn.Parameter(torch.zeros(n))
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
    n = layer_norm_call._plainly_valid(x, weight, bias, eps, residual)
    if n:
        layer_norm_call._validate(x, weight, bias, eps, residual)  # must not raise
        assert n == x.shape[-1]  # the record's normalized size


def test_layer_norm_fast_check_accepts_the_usual_call():
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    assert layer_norm_call._plainly_valid(x, w, b, 1e-5, None) == 8
    assert layer_norm_call._plainly_valid(x, w, b, 1e-12, torch.randn(4, 8)) == 8
    module = torch.nn.LayerNorm(8)  # a model's call: the weights are Parameters
    assert layer_norm_call._plainly_valid(x, module.weight, module.bias, 1e-5, x) == 8


@st.composite
def _weight_or_junk(draw, shape):
    """A (N, K) weight or an (N,) bias for an FFN layer, or something less than plain."""
    # mostly plain, so that calls with one flaw among good operands are common
    kind = draw(
        st.sampled_from(["ok"] * 8 + ["param"] * 4 + ["shape", "rank", "dtype", "strided",
                                                     "device", "junk", "none"])
    )  # fmt: skip
    if kind == "none":
        return None
    if kind == "junk":
        return draw(st.sampled_from([1.0, "w", [0.0]]))
    dtype = draw(st.sampled_from(DTYPES)) if kind == "dtype" else torch.float32
    if kind == "shape":  # one dimension off
        i = draw(st.integers(0, len(shape) - 1))
        shape = (*shape[:i], shape[i] + draw(st.integers(1, 2)), *shape[i + 1 :])
    if kind == "rank":
        shape = (*shape, 1)
    if kind == "strided":  # weights may be strided (a transposed view), biases not
        return torch.zeros(*shape[:-1], shape[-1] * 2, dtype=dtype)[..., ::2]
    t = torch.zeros(shape, dtype=dtype, device="meta" if kind == "device" else "cpu")
    return torch.nn.Parameter(t) if kind == "param" and dtype.is_floating_point else t


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_ffn_fast_check_implies_full_check(data):
    k, n, h = (data.draw(st.integers(1, 4)) for _ in range(3))
    rows = data.draw(st.integers(1, 3))
    x_dtype = data.draw(st.sampled_from([torch.float32] * 4 + DTYPES))
    x = torch.zeros(rows, k, dtype=x_dtype)
    if data.draw(st.integers(0, 4)) == 0:
        x = torch.zeros(k, rows, dtype=x_dtype).t()  # a strided last dim
    op = data.draw(st.sampled_from([ffn_call.OP_GELU_FFN, ffn_call.OP_LINEAR_GELU]))
    w1, b1 = data.draw(_weight_or_junk((n, k))), data.draw(_weight_or_junk((n,)))
    w2, b2 = data.draw(_weight_or_junk((h, n))), data.draw(_weight_or_junk((h,)))
    residual = data.draw(_weight_or_junk((rows, h)))
    approximate = data.draw(st.sampled_from(["none", "tanh"] * 3 + ["erf", None, 0]))
    if op == ffn_call.OP_LINEAR_GELU:
        w2 = b2 = residual = None
    if (op == ffn_call.OP_LINEAR_GELU or w2 is not None) and ffn_call._plainly_valid(
        x, w1, b1, w2, b2, residual, approximate
    ):
        ffn_call._validate(op, x, w1, b1, w2, b2, residual, approximate)  # must not raise


def test_ffn_fast_check_accepts_a_layers_call_and_refuses_a_missing_second_layer():
    fc1, fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
    x = torch.randn(2, 5, 8)
    for w1 in (fc1.weight, fc1.weight.detach()):
        assert ffn_call._plainly_valid(x, w1, fc1.bias, fc2.weight, fc2.bias, x, "none")
        assert ffn_call._plainly_valid(x, w1, fc1.bias, None, None, None, "tanh")
    assert ffn_call._plainly_valid(x, fc1.weight, None, fc2.weight.t().t(), None, None, "none")
    with pytest.raises(TypeError, match=r"w2 must be a torch\.Tensor"):
        ffn_call.FFNCall.checked(ffn_call.OP_GELU_FFN, x, fc1.weight, fc1.bias, approximate="none")


@st.composite
def _qkv_or_junk(draw, shape):
    kind = draw(
        st.sampled_from(["ok", "ok", "dtype", "rank", "strided", "device", "junk", "shape"])
    )
    if kind == "junk":
        return draw(st.sampled_from([1.0, "q", None]))
    dtype = draw(st.sampled_from(DTYPES)) if kind == "dtype" else torch.float32
    if kind == "rank":
        return torch.zeros(shape[1:], dtype=dtype)
    if kind == "strided":
        return torch.zeros(*shape[:-1], shape[-1] * 2, dtype=dtype)[..., ::2]
    if kind == "shape":
        b, s, _, d = shape
        return torch.zeros(b, s, draw(st.integers(1, 3)), d + draw(st.integers(0, 1)), dtype=dtype)
    return torch.zeros(shape, dtype=dtype, device="meta" if kind == "device" else "cpu")


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_attention_fast_check_implies_full_check(data):
    b, sq, sk = (
        data.draw(st.integers(1, 2)),
        data.draw(st.integers(1, 3)),
        data.draw(st.integers(1, 3)),
    )
    h, hkv = data.draw(st.sampled_from([(2, 2), (2, 1), (3, 2), (4, 2)]))
    d = data.draw(st.integers(1, 4))
    q = data.draw(_qkv_or_junk((b, sq, h, d)))
    k = data.draw(_qkv_or_junk((b, sk, hkv, d)))
    v = data.draw(st.sampled_from(["same", "other"]))
    v = k if v == "same" else data.draw(_qkv_or_junk((b, sk, hkv, d)))
    mask = data.draw(st.sampled_from([None, "ok", "float", "shape"]))
    mask = {
        None: None,
        "ok": torch.ones(b, sk, dtype=torch.bool),
        "float": torch.ones(b, sk),
        "shape": torch.ones(b, sk + 1, dtype=torch.bool),
    }[mask]
    causal = data.draw(st.sampled_from([True, False, 1, None]))
    scale = data.draw(st.sampled_from([None, 0.5, 0.0, -1.0, float("inf"), 2, True]))
    p = data.draw(st.sampled_from([0.0, 0, 0.1, 1.0, -0.1, float("nan"), True]))
    if attention_call._plainly_valid(q, k, v, causal, mask, scale, p):
        attention_call._validate_padded(q, k, v, causal, mask, scale, p)  # must not raise


@st.composite
def _aliased_cache(draw, shape):
    """A cache whose rows share memory (refused when appended to, fine when only read)."""
    b, s, hkv, d = shape
    kind = draw(st.sampled_from(["batch", "seq", "heads", "overlap"]))
    if kind == "overlap":  # rows one element apart
        return torch.zeros(b * s * hkv + d).as_strided(shape, (s * hkv, hkv, 1, 1))
    one = {"batch": (1, s, hkv, d), "seq": (b, 1, hkv, d), "heads": (b, s, 1, d)}[kind]
    return torch.zeros(one).expand(shape)


_KV_ARGS = ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v", "causal", "softmax_scale")


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_kvcache_fast_check_implies_full_check(data):
    # A valid decode step with one or two arguments corrupted: whenever the fast check
    # accepts, every check passes.
    b, sq, s_max = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), 4
    h, hkv = data.draw(st.sampled_from([(2, 2), (2, 1), (4, 2)]))
    d = data.draw(st.integers(1, 4))
    args = dict(
        q=torch.zeros(b, sq, h, d), k_cache=torch.zeros(b, s_max, hkv, d),
        v_cache=torch.zeros(b, s_max, hkv, d), cache_seqlens=torch.zeros(b, dtype=torch.int32),
        k=torch.zeros(b, sq, hkv, d), v=torch.zeros(b, sq, hkv, d), causal=True,
        softmax_scale=None,
    )  # fmt: skip
    if data.draw(st.booleans()):
        args["k"] = args["v"] = None
    for name in data.draw(st.lists(st.sampled_from(_KV_ARGS), min_size=1, max_size=2)):
        if name in ("q", "k_cache", "v_cache", "k", "v"):
            shape = (b, s_max, hkv, d) if "cache" in name else (b, sq, h if name == "q" else hkv, d)
            args[name] = data.draw(st.one_of(st.none(), _qkv_or_junk(shape)))
            if "cache" in name and data.draw(st.booleans()):
                args[name] = data.draw(_aliased_cache(shape))
            if name == "q" and isinstance(args["q"], torch.Tensor) and data.draw(st.booleans()):
                args["q"] = torch.zeros(b, sq, data.draw(st.integers(1, 5)), d)  # other heads
        elif name == "cache_seqlens":
            args[name] = data.draw(st.sampled_from([
                torch.zeros(b, dtype=torch.int64), torch.zeros(b + 1, dtype=torch.int32),
                torch.zeros(b, 1, dtype=torch.int32), torch.zeros(b, dtype=torch.int32, device="meta"),
                0, [0] * b, True,
            ]))  # fmt: skip
        elif name == "causal":
            args[name] = data.draw(st.sampled_from([1, None, "yes", False]))
        else:
            args[name] = data.draw(st.sampled_from([0.5, 0.0, -1.0, float("inf"), 2, True, "x"]))
    if (
        data.draw(st.booleans())
        and isinstance(args["q"], torch.Tensor)
        and args["q"].dtype.is_floating_point
    ):
        args["q"] = args["q"].clone().requires_grad_()
    call = tuple(args[n] for n in _KV_ARGS)
    if kvcache_call._plainly_valid(*call):
        kvcache_call._validate(*call)  # must not raise


def test_kvcache_fast_check_accepts_a_decode_step():
    q, kc, vc = torch.randn(2, 1, 4, 8), torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8)
    k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    lens = torch.tensor([3, 0], dtype=torch.int32)
    with torch.no_grad():
        assert kvcache_call._plainly_valid(q, kc, vc, lens, k, v, True, None)
        assert kvcache_call._plainly_valid(q, kc, vc, lens, None, None, True, 0.25)


def _decode_step(**changes):
    q, kc, vc = torch.zeros(2, 1, 4, 8), torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8)
    args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=torch.zeros(2, dtype=torch.int32),
                k=torch.zeros(2, 1, 2, 8), v=torch.zeros(2, 1, 2, 8), causal=True,
                softmax_scale=None)  # fmt: skip
    args.update(changes)
    return tuple(args[n] for n in _KV_ARGS)


@pytest.mark.parametrize(
    "changes",
    [
        dict(q=torch.zeros(2, 1, 3, 8)),  # 3 query heads over 2 kv heads
        dict(q=torch.zeros(2, 1, 4, 16)[..., ::2]),  # strided head_dim
        dict(q=torch.zeros(2, 1, 4, 8, dtype=torch.float64)),
        dict(q=torch.zeros(2, 1, 4, 8, requires_grad=True)),
        dict(v_cache=torch.zeros(2, 15, 2, 8)),
        dict(k_cache=torch.zeros(1, 16, 2, 8).expand(2, 16, 2, 8)),  # appended to in place
        dict(v_cache=torch.zeros(2, 1, 2, 8).expand(2, 16, 2, 8)),
        dict(k_cache=torch.zeros(2, 16, 2, 8, device="meta")),
        dict(k=torch.zeros(2, 1, 4, 8)),  # appended k over the query heads
        dict(v=torch.zeros(2, 2, 2, 8)),
        dict(v=None),
        dict(cache_seqlens=torch.zeros(2, dtype=torch.int64)),
        dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)),
        dict(cache_seqlens=3),
        dict(causal=1),
        dict(softmax_scale=0.0),
        dict(softmax_scale=float("inf")),
        dict(softmax_scale=2),
    ],
    ids=lambda c: next(iter(c)),
)
def test_kvcache_fast_check_refuses_each_corruption(changes):
    call = _decode_step(**changes)
    assert kvcache_call._plainly_valid(*_decode_step())
    assert not kvcache_call._plainly_valid(*call)
