"""fastlm.attention_with_kvcache: outputs, the in-place append, and the defined results for
empty caches and out-of-range lengths, on every backend.

Two oracles in fp64: fastlm.reference.attention_kvcache, and PyTorch's own
F.scaled_dot_product_attention (math backend) over each sequence's gathered valid keys
with an explicit bottom-right causal mask (independent of fastlm, so a bug shared by a
kernel and the reference cannot hide). The low-precision baseline of the parity rule is
SDPA math in the input dtype, never fastlm's code. Defaults are exercised without passing
softmax_scale: the SDPA oracle then uses PyTorch's own default scale.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastlm
from fastlm.backends import BackendUnavailableError
from fastlm.ops.attention_kvcache import KVCacheCall, _torch
from fastlm.ops.attention_kvcache._op import attention_with_kvcache_op
from fastlm.reference import attention_kvcache as ref
from tests.parity import assert_parity

BACKENDS = ["triton", "torch", "reference"]
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)

# (batch, Sq, H, Hkv, head_dim, S_max, cache_seqlens, append, causal)
CASES = {
    "sq1-mha-hd32": (3, 1, 4, 4, 32, 33, [0, 17, 32], True, True),
    "sq3-gqa4:2-hd64": (3, 3, 4, 2, 64, 40, [0, 5, 37], True, True),
    "sq3-gqa4:1-hd80": (2, 3, 4, 1, 80, 50, [20, 47], True, True),
    "sq1-gqa4:1-hd128-noappend": (2, 1, 4, 1, 128, 24, [7, 24], False, True),
    "sq3-short-noappend": (2, 3, 4, 2, 32, 20, [2, 0], False, True),  # rows with no key
    "sq3-noncausal": (2, 3, 2, 1, 64, 30, [0, 11], True, False),
    "sq17-b1-gqa3:1-hd40": (1, 17, 3, 1, 40, 37, [19], True, True),  # odd sizes, chunked prefill
    "sq1-hd256": (1, 1, 2, 1, 256, 20, [13], True, True),
    # S_max long enough that the automatic choice splits the keys (2 splits on the CPU).
    "sq1-autosplit": (2, 1, 2, 1, 32, 130, [0, 129], True, True),
}


def _make(case, dtype, device, *, strided=False, garbage=None):
    """The case's tensors; ``garbage`` (a float) fills every cache row at or past
    cache_seqlens[b], as in a cache allocated with torch.empty."""
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
    if garbage is not None:
        past = torch.arange(s_max, device=device)[None, :] >= seqlens[:, None]  # (B, S_max)
        for cache in (k_cache, v_cache):
            cache[past] = garbage
    return q, k_cache, v_cache, seqlens, k, v, causal


def _oracle(q, k_cache, v_cache, seqlens, k, v, causal, scale=None, *, upcast=True):
    """PyTorch's SDPA (math backend) over each sequence's valid prefix + new keys, with an
    explicit bottom-right causal mask: fp64 (upcast) or the input dtype (the parity rule's
    baseline). ``scale`` None leaves the default to PyTorch. Caches are not modified."""
    ct = torch.float64 if upcast else q.dtype
    outs = []
    for b, n in enumerate(seqlens.tolist()):
        kb, vb = k_cache[b, :n], v_cache[b, :n]
        if k is not None:
            kb, vb = torch.cat([kb, k[b]]), torch.cat([vb, v[b]])
        sq, n_keys = q.shape[1], kb.shape[0]
        mask = torch.ones(sq, n_keys, dtype=torch.bool, device=q.device)
        if causal:  # token i sees keys j <= n_keys - sq + i
            mask = mask.tril(diagonal=n_keys - sq)
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(
                q[b].transpose(0, 1).to(ct), kb.transpose(0, 1).to(ct),
                vb.transpose(0, 1).to(ct), attn_mask=mask, scale=scale,
                enable_gqa=q.shape[2] != kb.shape[1],
            ).transpose(0, 1)  # fmt: skip
        # A query with no key to attend to gives zeros (the documented contract), whatever SDPA returns.
        outs.append(torch.where(mask.any(-1)[:, None, None], o, 0.0))
    return torch.stack(outs)


def _reference(q, k_cache, v_cache, seqlens, k, v, causal, scale):
    """fastlm.reference in fp64 on copies of the caches -> (out, k_cache, v_cache)."""
    kc, vc = k_cache.double(), v_cache.double()
    up = (None, None) if k is None else (k.double(), v.double())
    out = ref.attention_with_kvcache(q.double(), kc, vc, seqlens, *up, causal, scale)
    return out, kc, vc


def _expected_cache(cache, seqlens, new):
    out = cache.clone()
    if new is not None:
        for b, n in enumerate(seqlens.tolist()):
            out[b, n : n + new.shape[1]] = new[b]
    return out


def _check(case, dtype, device, backend, *, strided=False, scale=None, garbage=None):
    """One call of the public op against both oracles; the caches hold exactly the new
    rows. ``scale`` None calls the op without softmax_scale (its default). The oracles
    read only each sequence's valid rows, whatever ``garbage`` fills the others with."""
    q, kc, vc, seqlens, k, v, causal = _make(case, dtype, device, strided=strided, garbage=garbage)
    kc0, vc0 = kc.clone(), vc.clone()
    out = fastlm.attention_with_kvcache(
        q, kc, vc, seqlens, k=k, v=v, causal=causal, softmax_scale=scale, backend=backend
    )
    sdpa = _oracle(q, kc0, vc0, seqlens, k, v, causal, scale)
    base = _oracle(q, kc0, vc0, seqlens, k, v, causal, scale, upcast=False)
    d = q.shape[-1]
    want, kc_ref, vc_ref = _reference(q, kc0, vc0, seqlens, k, v, causal, scale or d**-0.5)
    # The two oracles agree with each other first: neither can hide a shared mistake.
    torch.testing.assert_close(want, sdpa, rtol=1e-10, atol=1e-10)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_parity(out, want, base, name=f"out[{backend}] vs reference")
    assert_parity(out, sdpa, base, name=f"out[{backend}] vs SDPA")
    # The cache holds the new keys at their rows and nothing else changed (garbage included).
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(kc, _expected_cache(kc0, seqlens, k), **exact)
    torch.testing.assert_close(vc, _expected_cache(vc0, seqlens, v), **exact)
    torch.testing.assert_close(kc_ref, _expected_cache(kc0, seqlens, k).double(), **exact)
    torch.testing.assert_close(vc_ref, _expected_cache(vc0, seqlens, v).double(), **exact)
    assert seqlens.tolist() == case[6], "cache_seqlens must not be advanced by the op"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_parity_and_append(case, dtype, device, backend):
    _check(CASES[case], dtype, device, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_caches_and_explicit_scale(dtype, device, backend):
    _check(CASES["sq3-gqa4:2-hd64"], dtype, device, backend, strided=True, scale=0.3)


GARBAGE_CASES = ["sq1-mha-hd32", "sq3-gqa4:2-hd64", "sq1-gqa4:1-hd128-noappend",
                 "sq3-short-noappend", "sq3-noncausal"]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("case", GARBAGE_CASES)
def test_rows_past_the_lengths_are_never_read(case, garbage, dtype, device, backend):
    """A cache allocated with torch.empty holds anything past cache_seqlens: NaN or inf
    there made every output NaN on the torch and reference backends (a masked score is
    still NaN, and a zero probability times a NaN value is NaN). The outputs must equal
    attention over the valid rows alone, with or without an append, MHA and GQA."""
    _check(CASES[case], dtype, device, backend, garbage=garbage)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("case", GARBAGE_CASES)
def test_torch_masked_path_never_reads_rows_past_the_lengths(case, garbage, dtype, device):
    """The torch backend's path for lengths not read on the host (CUDA, torch.compile),
    which attends over the whole cache with a mask, on the same garbage."""
    q, kc, vc, seqlens, k, v, causal = _make(CASES[case], dtype, device, garbage=garbage)
    kc0, vc0 = kc.clone(), vc.clone()
    call = KVCacheCall.checked(q, kc, vc, seqlens, k, v, causal, None)
    out = _torch.run(dataclasses.replace(call, host_lengths=None))
    base = _oracle(q, kc0, vc0, seqlens, k, v, causal, upcast=False)
    assert_parity(out, _oracle(q, kc0, vc0, seqlens, k, v, causal), base, name="out")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_forced_splits_strided_cache(num_splits, dtype, device):
    """The Triton launchers with splits > 1 (more splits than key blocks included) and
    non-contiguous caches, against the SDPA oracle."""
    from fastlm.kernels.attention_decode import append_kv, decode_attention

    q, kc, vc, seqlens, k, v, causal = _make(CASES["sq3-gqa4:2-hd64"], dtype, device, strided=True)
    kc0, vc0 = kc.clone(), vc.clone()
    append_kv(kc, vc, seqlens, k, v)
    scale = q.shape[-1] ** -0.5
    out = decode_attention(q, kc, vc, seqlens, k.shape[1], causal, scale, num_splits)
    base = _oracle(q, kc0, vc0, seqlens, k, v, causal, upcast=False)
    assert_parity(out, _oracle(q, kc0, vc0, seqlens, k, v, causal), base, name="out")
    torch.testing.assert_close(kc, _expected_cache(kc0, seqlens, k), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["python-int", "stride-2-view"])
def test_seqlens_forms(device, backend, form):
    """cache_seqlens as a python int, and as a stride-2 view (read as such, not as if its
    stride were 1: the kernels get a contiguous copy)."""
    bsz, sq, h, hkv, d, s_max = 2, 2, 4, 2, 32, 16
    q = torch.randn(bsz, sq, h, d, device=device)
    kc, vc = (torch.randn(bsz, s_max, hkv, d, device=device) for _ in range(2))
    k, v = (torch.randn(bsz, sq, hkv, d, device=device) for _ in range(2))
    if form == "python-int":
        lens, values = 9, torch.full((bsz,), 9, dtype=torch.int32, device=device)
    else:
        lens = torch.tensor([9, 1000, 3, 1000], dtype=torch.int32, device=device)[::2]
        values = lens.clone()
    kc0, vc0 = kc.clone(), vc.clone()
    out = fastlm.attention_with_kvcache(q, kc, vc, lens, k=k, v=v, backend=backend)
    base = _oracle(q, kc0, vc0, values, k, v, True, upcast=False)
    assert_parity(out, _oracle(q, kc0, vc0, values, k, v, True), base, name="out")
    torch.testing.assert_close(kc, _expected_cache(kc0, values, k), rtol=0, atol=0)
    torch.testing.assert_close(vc, _expected_cache(vc0, values, v), rtol=0, atol=0)


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
            everything = torch.full((1,), end, dtype=torch.int32, device=device)
            full = _oracle(queries[b : b + 1, :end], keys[b : b + 1], vals[b : b + 1],
                           everything, None, None, True)  # fmt: skip
            assert_parity(out[b], full[0, -step:], name=f"step output b={b}")
        seqlens += step
    for b, n in enumerate(seqlens.tolist()):
        torch.testing.assert_close(kc[b, :n], keys[b, :n], rtol=0, atol=0)


# ------------------------------------------------------------------ empty caches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", ["int", "tensor"])
def test_empty_cache_without_append_gives_zeros(device, backend, lens):
    """S_max = 0, nothing appended: no key exists, so every output is zero (not NaN, not an
    IndexError)."""
    q = torch.randn(2, 3, 4, 32, device=device)
    kc = torch.empty(2, 0, 2, 32, device=device)
    seqlens = 0 if lens == "int" else torch.zeros(2, dtype=torch.int32, device=device)
    out = fastlm.attention_with_kvcache(q, kc, kc.clone(), seqlens, backend=backend)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cache_with_append_is_rejected_on_cpu(backend):
    q = torch.randn(2, 1, 4, 32)
    kc, new = torch.empty(2, 0, 2, 32), torch.randn(2, 1, 2, 32)
    for lens in (0, torch.zeros(2, dtype=torch.int32)):
        with pytest.raises(ValueError, match="S_max=0"):
            fastlm.attention_with_kvcache(q, kc, kc.clone(), lens, k=new, v=new, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cache_with_append_unchecked_gives_nan(device, backend):
    """What CUDA callers get (their lengths are not read on the host): nothing fits, so no
    write and NaN outputs, without a crash."""
    q = torch.randn(2, 1, 4, 32, device=device)
    kc, new = torch.empty(2, 0, 2, 32, device=device), torch.randn(2, 1, 2, 32, device=device)
    seqlens = torch.zeros(2, dtype=torch.int32, device=device)
    out = _run_unchecked(backend, q, kc, kc.clone(), seqlens, new, new, True, 0.2)
    assert torch.isnan(out).all()


def test_empty_batch(device):
    q = torch.randn(0, 1, 4, 32, device=device)
    kc = torch.randn(0, 8, 2, 32, device=device)
    seqlens = torch.zeros(0, dtype=torch.int32, device=device)
    for backend in BACKENDS:
        out = fastlm.attention_with_kvcache(q, kc, kc.clone(), seqlens, backend=backend)
        assert out.shape == (0, 1, 4, 32)


# ------------------------------------------------------------------ lengths the host did not check


def _run_unchecked(backend, q, kc, vc, seqlens, k, v, causal, scale):
    """The op as it runs on CUDA tensors, whose cache_seqlens values are never read on the
    host: the kernel backends through the custom op, the torch backend through its run()."""
    if backend == "torch":
        return _torch.run(KVCacheCall(q, kc, vc, seqlens, k, v, causal, scale))
    return attention_with_kvcache_op(q, kc, vc, seqlens, k, v, causal, scale, backend)


def _guarded(shape, guard, device):
    """A cache that is a view into a bigger buffer: ``guard`` sentinel rows before and
    after each sequence, and a sentinel sequence before and after the batch."""
    bsz, s_max, hkv, d = shape
    buf = torch.full((bsz + 2, s_max + 2 * guard, hkv, d), 1234.5, device=device)
    return buf, buf[1:-1, guard:-guard]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("append", [True, False], ids=["append", "noappend"])
def test_out_of_range_lengths_give_nan_and_touch_nothing(device, backend, append):
    """Lengths out of range (negative, one token too long, near the int32 limits, where
    L_b = cache_seqlens + Sq wraps around): NaN outputs for those sequences, their caches
    untouched, no write outside the caches, the valid sequences exact."""
    bsz, sq, h, hkv, d, s_max, guard = 7, 3, 4, 2, 32, 12, 4
    k_buf, kc = _guarded((bsz, s_max, hkv, d), guard, device)
    v_buf, vc = _guarded((bsz, s_max, hkv, d), guard, device)
    kc.normal_(), vc.normal_()
    q = torch.randn(bsz, sq, h, d, device=device)
    k, v = (
        (torch.randn(bsz, sq, hkv, d, device=device) for _ in range(2)) if append else (None,) * 2
    )
    room = s_max - (sq if append else 0)
    lens = [-1, room + 1, 4, INT32_MAX, INT32_MIN, INT32_MAX - 1, room]
    good = [False, False, True, False, False, False, True]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    k_buf0, v_buf0 = k_buf.clone(), v_buf.clone()
    out = _run_unchecked(backend, q, kc, vc, seqlens, k, v, True, 0.125)

    ok = torch.tensor(good, device=device)
    assert torch.isnan(out[~ok]).all()
    assert not torch.isnan(out[ok]).any()
    # Nothing written but the valid sequences' new rows: the guards and bad sequences keep
    # every value.
    kc_want, vc_want = kc.clone(), vc.clone()  # the views' current values at valid rows
    for b in range(bsz):
        if not good[b]:
            kc_want[b], vc_want[b] = k_buf0[1 + b, guard:-guard], v_buf0[1 + b, guard:-guard]
    for buf, buf0, cache, want in ((k_buf, k_buf0, kc, kc_want), (v_buf, v_buf0, vc, vc_want)):
        written = torch.zeros_like(buf, dtype=torch.bool)
        written[1:-1, guard:-guard] = True
        assert torch.equal(buf[~written], buf0[~written]), "a write outside the cache"
        torch.testing.assert_close(cache, want, rtol=0, atol=0)
    idx = ok.nonzero().flatten()
    cache0 = k_buf0[1:-1, guard:-guard][idx], v_buf0[1:-1, guard:-guard][idx]
    kv = (None, None) if k is None else (k[idx], v[idx])
    want = _oracle(q[idx], *cache0, seqlens[idx], *kv, True, 0.125)
    assert_parity(out[idx], want, name="valid sequences")
    if k is not None:
        want_kc = _expected_cache(cache0[0], seqlens[idx], k[idx])
        torch.testing.assert_close(kc[idx], want_kc, rtol=0, atol=0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_out_of_range_lengths_every_split_path(device, num_splits):
    """The split kernel writing out directly (1 split) and through the combine kernel."""
    from fastlm.kernels.attention_decode import decode_attention

    q = torch.randn(3, 2, 4, 32, device=device)
    kc = torch.randn(3, 40, 2, 32, device=device)
    seqlens = torch.tensor([INT32_MAX, 39, -5], dtype=torch.int32, device=device)
    out = decode_attention(q, kc, kc, seqlens, 1, True, 0.2, num_splits)  # 1 token appended
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()
    assert not torch.isnan(out[1]).any()


# ------------------------------------------------------------------ the torch backend


@pytest.mark.parametrize("lengths", ["read-by-the-checks", "never-read"])
def test_torch_backend_decode_step_is_sync_free(monkeypatch, device, lengths):
    """No host read of a tensor during the torch backend's step (append + attention): it
    captures in a CUDA graph and traces without graph breaks. Lengths the checks read
    (eager CPU) are used from the record; lengths never read (CUDA) take the masked path."""
    q, kc, vc, seqlens, k, v, causal = _make(CASES["sq3-gqa4:2-hd64"], torch.float32, device)
    call = KVCacheCall.checked(q, kc, vc, seqlens, k, v, causal, None)
    if lengths == "never-read":
        call = dataclasses.replace(call, host_lengths=None)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the decode step")

    for name in ("item", "__bool__", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = _torch.run(call)
    monkeypatch.undo()
    assert not torch.isnan(out).any()


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


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(device, backend):
    q, kc, vc, seqlens, k, v, causal = _make(CASES["sq1-mha-hd32"], torch.float32, device)
    seqlens = torch.tensor([0, 3, 30], dtype=torch.int32, device=device)
    args = (q, kc, vc, seqlens, k, v, causal, 0.2, backend)
    torch.library.opcheck(
        attention_with_kvcache_op, args, test_utils=("test_schema", "test_faketensor")
    )


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
        assert choose_num_splits(12, 65536, 128, cuda) == -(-2 * sms // 12)
        assert choose_num_splits(64 * 12, 8192, 128, cuda) == 1  # a full batch needs none
        assert choose_num_splits(4, 100, 128, cuda) == 1  # too short to be worth splitting


# ------------------------------------------------------------------ caches that alias themselves


def _aliased_cache(layout, bsz, s_max, hkv, d, device, dtype=torch.float32):
    """A (B, S_max, Hkv, D) cache whose rows share memory: one row broadcast over the
    batch, the positions or the kv heads (stride 0), or rows one element apart."""
    if layout == "overlapping-rows":
        buf = torch.randn(bsz * s_max * hkv + d, device=device).to(dtype)
        return buf.as_strided((bsz, s_max, hkv, d), (s_max * hkv, hkv, 1, 1))
    one = {
        "expanded-batch": (1, s_max, hkv, d),
        "expanded-seq": (bsz, 1, hkv, d),
        "expanded-heads": (bsz, s_max, 1, d),
    }[layout]
    return torch.randn(one, device=device).to(dtype).expand(bsz, s_max, hkv, d)


ALIASED = ["expanded-batch", "expanded-seq", "expanded-heads", "overlapping-rows"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
@pytest.mark.parametrize("layout", ALIASED)
def test_append_into_aliased_cache_is_refused(device, backend, which, layout):
    """Appending writes every sequence's new row into the cache in place: into a cache
    whose rows share memory, one sequence's row overwrote another's and the outputs were
    wrong. Refused as PyTorch refuses an in-place write into an expanded tensor, with the
    caches left as they were."""
    bsz, sq, h, hkv, d, s_max = 2, 1, 4, 2, 4, 6
    q = torch.randn(bsz, sq, h, d, device=device)
    caches = {n: torch.randn(bsz, s_max, hkv, d, device=device) for n in ("k_cache", "v_cache")}
    caches[which] = _aliased_cache(layout, bsz, s_max, hkv, d, device)
    before = {n: c.clone() for n, c in caches.items()}
    k, v = (torch.randn(bsz, sq, hkv, d, device=device) for _ in range(2))
    seqlens = torch.tensor([1, 4], dtype=torch.int32, device=device)
    match = f"{which} (is expanded|has overlapping rows)"
    with pytest.raises(ValueError, match=match):
        fastlm.attention_with_kvcache(q, **caches, cache_seqlens=seqlens, k=k, v=v, backend=backend)
    for n, c in caches.items():
        assert torch.equal(c, before[n]), f"{n} was written before the refusal"
    # The same memory as a plain tensor is PyTorch's in-place write refused alike.
    if layout != "overlapping-rows":
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            caches[which].add_(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ALIASED)
def test_read_only_aliased_cache_is_fine(dtype, device, backend, layout):
    """Nothing appended, nothing written: a broadcast cache (one prompt shared by the
    batch) is read as the values it shows."""
    bsz, sq, h, hkv, d, s_max = 2, 2, 4, 2, 16, 6
    q = torch.randn(bsz, sq, h, d, device=device).to(dtype)
    kc, vc = (_aliased_cache(layout, bsz, s_max, hkv, d, device, dtype) for _ in range(2))
    seqlens = torch.tensor([3, 6], dtype=torch.int32, device=device)
    out = fastlm.attention_with_kvcache(q, kc, vc, seqlens, backend=backend)
    base = _oracle(q, kc, vc, seqlens, None, None, True, upcast=False)
    assert_parity(out, _oracle(q, kc, vc, seqlens, None, None, True), base, name="out")


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
    ("seqlens-bool", _bad(cache_seqlens=lambda a: True), TypeError, "cache_seqlens must be"),
    (
        "seqlens-shape",
        _bad(cache_seqlens=lambda a: a["cache_seqlens"][:1]),
        ValueError,
        "cache_seqlens must have shape",
    ),
    (
        "seqlens-device",
        _bad(cache_seqlens=lambda a: a["cache_seqlens"].to("meta")),
        ValueError,
        "cache_seqlens is on meta",
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
    ("int-negative", _bad(cache_seqlens=lambda a: -1), ValueError, "0 <= cache_seqlens"),
    (
        "gqa",
        _bad(
            k_cache=lambda a: torch.randn(2, 16, 3, 32), v_cache=lambda a: torch.randn(2, 16, 3, 32)
        ),
        ValueError,
        "multiple of the number of key/value heads",
    ),
    ("q-3d", _bad(q=lambda a: a["q"][:, 0]), ValueError, "4-D"),
    ("head-dim-0", _bad(q=lambda a: torch.randn(2, 1, 4, 0)), ValueError, "head_dim"),
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
    ("grad", _bad(q=lambda a: a["q"].requires_grad_()), NotImplementedError, "inference-only"),
]


def _call(args, **kwargs):
    q, kc, vc, cs = (args.pop(n) for n in ("q", "k_cache", "v_cache", "cache_seqlens"))
    return fastlm.attention_with_kvcache(q, kc, vc, cs, backend="torch", **args, **kwargs)


@pytest.mark.parametrize("make,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(make, exc, match):
    # On the CPU: that is where cache_seqlens values are checked (CUDA gives NaN instead).
    with pytest.raises(exc, match=match):
        _call(make(torch.device("cpu")))


@pytest.mark.parametrize("scale", [0, 0.0, -0.5, float("nan"), float("inf"), True, "0.1"], ids=repr)
def test_softmax_scale_checked_exactly_like_attention(scale):
    """Issue 8: the kvcache op accepted softmax_scale=0 or negative where fastlm.attention
    rejects both. The two must raise the same error for every bad scale."""
    q = torch.randn(2, 1, 4, 32)
    with pytest.raises((TypeError, ValueError)) as want:
        fastlm.attention(q, q, q, softmax_scale=scale)
    with pytest.raises(want.type, match="softmax_scale must be") as got:
        _call(_good(torch.device("cpu")), softmax_scale=scale)
    assert str(got.value).split(": ", 1)[1] == str(want.value).split(": ", 1)[1]


def test_causal_must_be_bool():
    with pytest.raises(TypeError, match="causal must be a bool"):
        _call(_good(torch.device("cpu")), causal=1)


def test_head_dim_limit_names_the_backend(device):
    q = torch.randn(1, 1, 2, 288, device=device)
    kc = torch.randn(1, 8, 2, 288, device=device)
    with pytest.raises(BackendUnavailableError, match="head_dim 288"):
        fastlm.attention_with_kvcache(q, kc, kc.clone(), 4, backend="triton")
    for backend in ("torch", "reference"):  # no limit there
        out = fastlm.attention_with_kvcache(q, kc, kc.clone(), 4, backend=backend)
        assert_parity(
            out, _oracle(q, kc, kc, torch.tensor([4], dtype=torch.int32), None, None, True)
        )


def test_no_grad_is_fine_with_requires_grad():
    a = _good(torch.device("cpu"))
    a["q"].requires_grad_()
    with torch.no_grad():
        out = _call(a)
    assert not out.requires_grad
