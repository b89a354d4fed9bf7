"""fastlm.attention_with_kvcache against full attention over each sequence's valid prefix.

The oracle is fastlm.reference.attention.attention in fp64 over the concatenation of the
cache rows [0, cache_seqlens[b]) and the new k, v, one sequence at a time; the
low-precision baseline of the parity rule is the same in the input dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlm
from fastlm.backends import BackendUnavailableError
from fastlm.ops import attention_kvcache as op
from fastlm.reference import attention as ref_attn
from tests.parity import assert_parity

BACKENDS = ["triton", "torch"]

# (batch, Sq, H, Hkv, head_dim, S_max, cache_seqlens, append, causal)
CASES = {
    "sq1-mha-hd32": (3, 1, 4, 4, 32, 33, [0, 17, 32], True, True),
    "sq3-gqa4:2-hd64": (3, 3, 4, 2, 64, 40, [0, 5, 37], True, True),
    "sq3-gqa4:1-hd80": (2, 3, 4, 1, 80, 50, [20, 47], True, True),
    "sq1-gqa4:1-hd128-noappend": (2, 1, 4, 1, 128, 24, [7, 24], False, True),
    "sq3-short-noappend": (2, 3, 4, 2, 32, 20, [2, 0], False, True),  # rows with no key
    "sq3-noncausal": (2, 3, 2, 1, 64, 30, [0, 11], True, False),
    "sq1-hd256": (1, 1, 2, 1, 256, 20, [13], True, True),
    # S_max long enough that the automatic choice splits the keys (2 splits on the CPU).
    "sq1-autosplit": (2, 1, 2, 1, 32, 130, [0, 129], True, True),
}


def _make(case, dtype, device, *, strided=False):
    bsz, sq, h, hkv, d, s_max, lens, append, causal = case
    q = torch.randn(bsz, sq, h, d, device=device).to(dtype)
    if strided:  # caches as (B, Hkv, S_max, D) storage viewed as (B, S_max, Hkv, D)
        k_cache = torch.randn(bsz, hkv, s_max, d, device=device).to(dtype).transpose(1, 2)
        v_cache = (
            torch.randn(bsz, hkv, s_max + 3, d, device=device).to(dtype)[:, :, 3:].transpose(1, 2)
        )
    else:
        k_cache = torch.randn(bsz, s_max, hkv, d, device=device).to(dtype)
        v_cache = torch.randn(bsz, s_max, hkv, d, device=device).to(dtype)
    k = torch.randn(bsz, sq, hkv, d, device=device).to(dtype) if append else None
    v = torch.randn(bsz, sq, hkv, d, device=device).to(dtype) if append else None
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, seqlens, k, v, causal


def _oracle(q, k_cache, v_cache, seqlens, k, v, causal, scale, *, upcast=True):
    """Full attention of each sequence over its valid prefix + new keys (caches unmodified)."""
    ct = torch.float64 if upcast else q.dtype
    outs = []
    for b, n in enumerate(seqlens.tolist()):
        kb, vb = k_cache[b, :n], v_cache[b, :n]
        if k is not None:
            kb, vb = torch.cat([kb, k[b]]), torch.cat([vb, v[b]])
        o = ref_attn.attention(
            q[b : b + 1].to(ct), kb[None].to(ct), vb[None].to(ct), causal,
            softmax_scale=scale, upcast=upcast,
        )  # fmt: skip
        outs.append(o)
    return torch.cat(outs)


def _expected_cache(cache, seqlens, new):
    out = cache.clone()
    if new is not None:
        for b, n in enumerate(seqlens.tolist()):
            out[b, n : n + new.shape[1]] = new[b]
    return out


def _check(case, dtype, device, backend, *, strided=False, num_splits=None, scale=None):
    q, kc, vc, seqlens, k, v, causal = _make(case, dtype, device, strided=strided)
    kc0, vc0 = kc.clone(), vc.clone()
    scale_used = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if num_splits is None:
        out = fastlm.attention_with_kvcache(
            q, kc, vc, seqlens, k=k, v=v, causal=causal, softmax_scale=scale, backend=backend
        )
    else:
        out = op._attention_with_kvcache(
            q, kc, vc, seqlens, k, v, causal, scale_used, num_splits, backend
        )
    oracle = _oracle(q, kc0, vc0, seqlens, k, v, causal, scale_used)
    base = _oracle(q, kc0, vc0, seqlens, k, v, causal, scale_used, upcast=False)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_parity(out, oracle, base, name=f"out[{backend}]")
    # The cache holds the new keys at their rows and nothing else changed.
    torch.testing.assert_close(kc, _expected_cache(kc0, seqlens, k), rtol=0, atol=0)
    torch.testing.assert_close(vc, _expected_cache(vc0, seqlens, v), rtol=0, atol=0)
    assert seqlens.tolist() == case[6], "cache_seqlens must not be advanced by the op"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_parity_and_append(case, dtype, device, backend):
    _check(CASES[case], dtype, device, backend)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_forced_splits_strided_cache(num_splits, dtype, device):
    """Splits > 1 (including more splits than key blocks) and non-contiguous caches."""
    _check(CASES["sq3-gqa4:2-hd64"], dtype, device, "triton", strided=True, num_splits=num_splits)


def test_softmax_scale_and_python_int_seqlens(device):
    bsz, sq, h, d, s_max = 2, 2, 4, 32, 16
    q = torch.randn(bsz, sq, h, d, device=device)
    kc = torch.randn(bsz, s_max, 2, d, device=device)
    vc = torch.randn_like(kc)
    k, v = torch.randn(bsz, sq, 2, d, device=device), torch.randn(bsz, sq, 2, d, device=device)
    kc0, vc0 = kc.clone(), vc.clone()
    out = fastlm.attention_with_kvcache(q, kc, vc, 9, k=k, v=v, softmax_scale=0.3, backend="triton")
    seqlens = torch.full((bsz,), 9, dtype=torch.int32)
    assert_parity(out, _oracle(q, kc0, vc0, seqlens, k, v, True, 0.3), name="out")
    torch.testing.assert_close(kc, _expected_cache(kc0, seqlens, k), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_loop_equals_full_recompute(device, backend):
    """Prefill 3 tokens then decode 4 steps of 1, ragged start lengths; every step's output
    equals causal attention over the whole sequence so far."""
    bsz, h, hkv, d, s_max = 2, 4, 2, 32, 24
    start = [5, 0]
    total = 3 + 4
    keys = torch.randn(bsz, max(start) + total, hkv, d, device=device)
    vals = torch.randn_like(keys)
    queries = torch.randn(bsz, max(start) + total, h, d, device=device)
    kc = torch.zeros(bsz, s_max, hkv, d, device=device)
    vc = torch.zeros_like(kc)
    for b, n in enumerate(start):  # the cache already holds each sequence's first tokens
        kc[b, :n], vc[b, :n] = keys[b, :n], vals[b, :n]
    seqlens = torch.tensor(start, dtype=torch.int32, device=device)
    for step in [3, 1, 1, 1, 1]:
        pos = seqlens.long()[:, None] + torch.arange(step, device=device)[None, :]
        q, k, v = (torch.stack([t[b, pos[b]] for b in range(bsz)]) for t in (queries, keys, vals))
        out = fastlm.attention_with_kvcache(q, kc, vc, seqlens, k=k, v=v, backend=backend)
        for b in range(bsz):
            end = int(seqlens[b]) + step
            full = ref_attn.attention(
                queries[b : b + 1, :end].double(), keys[b : b + 1, :end].double(),
                vals[b : b + 1, :end].double(), causal=True,
            )  # fmt: skip
            assert_parity(out[b], full[0, -step:], name=f"step output b={b}")
        seqlens += step
    for b, n in enumerate(seqlens.tolist()):
        torch.testing.assert_close(kc[b, :n], keys[b, :n], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_lengths_give_nan_and_leave_cache(device, backend):
    """What CUDA callers get for lengths the host did not check: NaN rows, cache untouched,
    other sequences unaffected. (The public function rejects these on CPU; the op is called
    directly here to exercise the device-side path.)"""
    q, kc, vc, _, k, v, causal = _make(CASES["sq3-gqa4:2-hd64"], torch.float32, device)
    s_max = kc.shape[1]
    seqlens = torch.tensor([-1, s_max - 2, 4], dtype=torch.int32, device=device)  # bad, bad, ok
    kc0, vc0 = kc.clone(), vc.clone()
    out = op._attention_with_kvcache(q, kc, vc, seqlens, k, v, causal, 0.125, 2, backend)
    assert torch.isnan(out[:2]).all()
    assert not torch.isnan(out[2]).any()
    torch.testing.assert_close(kc[:2], kc0[:2], rtol=0, atol=0)
    torch.testing.assert_close(vc[:2], vc0[:2], rtol=0, atol=0)
    good = torch.tensor([4], dtype=torch.int32, device=device)
    oracle = _oracle(q[2:], kc0[2:], vc0[2:], good, k[2:], v[2:], causal, 0.125)
    assert_parity(out[2:], oracle, name="valid sequence")


def test_empty_batch_and_zero_new_tokens(device):
    q = torch.randn(0, 1, 4, 32, device=device)
    kc = torch.randn(0, 8, 2, 32, device=device)
    out = fastlm.attention_with_kvcache(
        q, kc, kc.clone(), torch.zeros(0, dtype=torch.int32, device=device), backend="triton"
    )
    assert out.shape == (0, 1, 4, 32)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU split heuristic; GPU tiles are larger"
)
def test_autosplit_case_really_splits(device):
    from fastlm.kernels.attention_decode import _block_n, choose_num_splits

    bsz, _, _, hkv, d, s_max, *_ = CASES["sq1-autosplit"]
    assert choose_num_splits(bsz * hkv, s_max, _block_n(d, torch.float32, device), device) > 1


def test_auto_num_splits_fills_the_device():
    from fastlm.kernels.attention_decode import choose_num_splits

    cuda = torch.device("cuda")
    # Few programs and a long cache: split up to about two waves of an SM-count-132 GPU.
    sms = 132
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fastlm.kernels.attention_decode.num_programs_hint", lambda dev: sms)
        assert choose_num_splits(12, 8192, 128, cuda) == 16  # capped by 4 key blocks per split
        assert choose_num_splits(12, 65536, 128, cuda) == math.ceil(2 * sms / 12)
        assert choose_num_splits(64 * 12, 8192, 128, cuda) == 1  # a full batch needs none
        assert choose_num_splits(4, 100, 128, cuda) == 1  # too short to be worth splitting


# ------------------------------------------------------------------ compile / opcheck


def test_torch_compile_fullgraph_torch_backend(device):
    q, kc, vc, seqlens, k, v, _ = _make(CASES["sq3-gqa4:2-hd64"], torch.float32, device)
    kc_eager, vc_eager = kc.clone(), vc.clone()

    def step(q, kc, vc, seqlens, k, v):
        return fastlm.attention_with_kvcache(q, kc, vc, seqlens, k=k, v=v, backend="torch")

    expected = step(q, kc_eager, vc_eager, seqlens, k, v)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, seqlens, k, v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(kc, kc_eager, rtol=0, atol=0)  # the in-place append survives
    torch.testing.assert_close(vc, vc_eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(device, backend):
    q, kc, vc, seqlens, k, v, causal = _make(CASES["sq1-mha-hd32"], torch.float32, device)
    seqlens = torch.tensor([0, 3, 30], dtype=torch.int32, device=device)
    args = (q, kc, vc, seqlens, k, v, causal, 0.2, 2, backend)
    torch.library.opcheck(
        op._attention_with_kvcache, args, test_utils=("test_schema", "test_faketensor")
    )


# ------------------------------------------------------------------ bad inputs


def _good(device):
    q = torch.randn(2, 1, 4, 32, device=device)
    kc = torch.randn(2, 16, 2, 32, device=device)
    vc = torch.randn(2, 16, 2, 32, device=device)
    k = torch.randn(2, 1, 2, 32, device=device)
    v = torch.randn(2, 1, 2, 32, device=device)
    return dict(
        q=q,
        k_cache=kc,
        v_cache=vc,
        cache_seqlens=torch.tensor([3, 15], dtype=torch.int32),
        k=k,
        v=v,
    )


def _bad(**changes):
    def make(device):
        args = _good(device)
        for key, fn in changes.items():
            args[key] = fn(args)
        return args

    return make


BAD = [
    ("seqlens-int64", _bad(cache_seqlens=lambda a: a["cache_seqlens"].long()), TypeError, "int32"),
    ("seqlens-float", _bad(cache_seqlens=lambda a: 3.0), TypeError, "cache_seqlens must be"),
    (
        "seqlens-shape",
        _bad(cache_seqlens=lambda a: a["cache_seqlens"][:1]),
        ValueError,
        "cache_seqlens must have shape",
    ),
    (
        "seqlens-overflow",
        _bad(cache_seqlens=lambda a: a["cache_seqlens"] + 1),
        ValueError,
        "S_max=16",
    ),
    (
        "seqlens-negative",
        _bad(cache_seqlens=lambda a: a["cache_seqlens"] - 4),
        ValueError,
        "0 <= cache_seqlens",
    ),
    ("int-overflow", _bad(cache_seqlens=lambda a: 16), ValueError, "S_max=16"),
    (
        "gqa",
        _bad(
            k_cache=lambda a: torch.randn(2, 16, 3, 32), v_cache=lambda a: torch.randn(2, 16, 3, 32)
        ),
        ValueError,
        "divide",
    ),
    ("q-3d", _bad(q=lambda a: a["q"][:, 0]), ValueError, "4-D"),
    ("k-without-v", _bad(v=lambda a: None), ValueError, "both k and v"),
    (
        "k-shape",
        _bad(k=lambda a: torch.randn(2, 2, 2, 32), v=lambda a: torch.randn(2, 2, 2, 32)),
        ValueError,
        "k must have shape",
    ),
    (
        "vcache-shape",
        _bad(v_cache=lambda a: torch.randn(2, 15, 2, 32)),
        ValueError,
        "v_cache must have shape",
    ),
    (
        "headdim",
        _bad(k_cache=lambda a: torch.randn(2, 16, 2, 16)),
        ValueError,
        "k_cache must have shape",
    ),
    (
        "batch",
        _bad(k_cache=lambda a: torch.randn(3, 16, 2, 32)),
        ValueError,
        r"k_cache must have shape \(2",
    ),
    ("dtype", _bad(k=lambda a: a["k"].half()), TypeError, "k has dtype float16"),
    ("int-q", _bad(q=lambda a: a["q"].int()), TypeError, "q must be one of"),
    (
        "last-dim",
        _bad(k_cache=lambda a: torch.randn(2, 16, 32, 2).transpose(2, 3)),
        ValueError,
        "contiguous last dimension",
    ),
    ("not-tensor", _bad(q=lambda a: [1.0]), TypeError, "q must be a torch.Tensor"),
    ("scale", _bad(), ValueError, "softmax_scale"),
    ("grad", _bad(q=lambda a: a["q"].requires_grad_()), NotImplementedError, "inference-only"),
]


@pytest.mark.parametrize("make,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(make, exc, match):
    # On the CPU: that is where cache_seqlens values are checked (CUDA gives NaN instead).
    args = make(torch.device("cpu"))
    scale = float("nan") if match == "softmax_scale" else None
    q, kc, vc, cs = (
        args.pop("q"),
        args.pop("k_cache"),
        args.pop("v_cache"),
        args.pop("cache_seqlens"),
    )
    with pytest.raises(exc, match=match):
        fastlm.attention_with_kvcache(q, kc, vc, cs, softmax_scale=scale, backend="torch", **args)


def test_head_dim_limit_names_the_backend(device):
    q = torch.randn(1, 1, 2, 288, device=device)
    kc = torch.randn(1, 8, 2, 288, device=device)
    with pytest.raises(BackendUnavailableError, match="head_dim 288"):
        fastlm.attention_with_kvcache(q, kc, kc.clone(), 4, backend="triton")
    out = fastlm.attention_with_kvcache(q, kc, kc.clone(), 4, backend="torch")  # no limit there
    assert out.shape == q.shape


def test_no_grad_is_fine_with_requires_grad():
    a = _good(torch.device("cpu"))
    q = a["q"].requires_grad_()
    with torch.no_grad():
        out = fastlm.attention_with_kvcache(
            q, a["k_cache"], a["v_cache"], a["cache_seqlens"], backend="torch"
        )
    assert not out.requires_grad
