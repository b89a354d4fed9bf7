"""Dispatch with the CUDA extension absent (every CPU machine): a forced cuda backend
raises with a readable reason, the automatic choice falls back silently, and the
dispatch table / per-call limits behave."""

from __future__ import annotations

import json

import pytest
import torch

import fastlm
from fastlm import _cuda_ext, backends, dispatch_table
from fastlm.reference import attention_kvcache as ref_kv
from fastlm.reference import ffn as ref_ffn
from fastlm.reference import layer_norm as ref

# On a GPU machine the reason check would trigger the JIT build: these tests describe
# machines without the extension, so they skip there.
needs_no_ext = pytest.mark.skipif(
    torch.cuda.is_available() or _cuda_ext.unavailable_reason() is None,
    reason="these tests describe a machine without the CUDA extension",
)


@needs_no_ext
def test_unavailable_reason_is_readable():
    reason = _cuda_ext.unavailable_reason()
    assert isinstance(reason, str) and reason
    assert "fastlm._C" in reason  # names what is missing ...
    assert "CUDA" in reason or "FASTLM_CUDA_JIT" in reason  # ... and why no JIT build


@needs_no_ext
def test_module_raises_with_reason():
    with pytest.raises(RuntimeError, match="CUDA backend unavailable"):
        _cuda_ext.module()


def test_forced_cuda_on_cpu_tensor_raises():
    x = torch.randn(3, 8)
    with pytest.raises(backends.BackendUnavailableError) as info:
        fastlm.layer_norm(x, None, None, backend="cuda")
    msg = str(info.value)
    assert "'cuda'" in msg and "layer_norm" in msg and "CUDA tensors" in msg


def test_forced_cuda_via_set_backend_raises():
    x = torch.randn(2, 4)
    fastlm.set_backend("cuda")
    try:
        with pytest.raises(backends.BackendUnavailableError, match="cuda"):
            fastlm.layer_norm(x, None, None)
    finally:
        fastlm.set_backend(None)


def test_auto_on_cpu_falls_back_silently():
    x, w, b = torch.randn(5, 16), torch.randn(16), torch.randn(16)
    y = fastlm.layer_norm(x, w, b)
    torch.testing.assert_close(y, ref.layer_norm(x, w, b))


@needs_no_ext
def test_auto_on_cuda_device_skips_unavailable_cuda(monkeypatch):
    """With triton unusable too, the automatic order goes past cuda to torch."""
    from fastlm.ops.layer_norm import BACKENDS
    from fastlm.ops.layer_norm.call import LayerNormCall

    monkeypatch.setattr(backends, "_triton_reason", lambda device: "triton disabled for this test")
    call = LayerNormCall.checked(torch.empty(2, 8, device="meta"), None, None, 1e-5, None)
    monkeypatch.setattr(LayerNormCall, "device", property(lambda self: torch.device("cuda")))
    assert backends.choose("layer_norm", call, BACKENDS) == "torch"
    with pytest.raises(backends.BackendUnavailableError, match=r"fastlm\._C"):
        backends.choose("layer_norm", call, BACKENDS, "cuda")


def test_jit_can_be_disabled(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("would rebuild state on a GPU machine")
    monkeypatch.setenv("FASTLM_CUDA_JIT", "0")
    _cuda_ext._reset_for_tests()
    try:
        assert "FASTLM_CUDA_JIT=0" in _cuda_ext.unavailable_reason()
    finally:
        monkeypatch.delenv("FASTLM_CUDA_JIT")
        _cuda_ext._reset_for_tests()
    assert "FASTLM_CUDA_JIT=0" not in _cuda_ext.unavailable_reason()


def test_csrc_dir_has_sources():
    import os

    src = _cuda_ext.csrc_dir()
    for f in ("binding.cpp", "fastlm_kernels.h", "layer_norm.cu", "attention_fwd.cu"):
        assert os.path.exists(os.path.join(src, f)), f


def test_default_order_is_triton_first():
    assert dispatch_table.preferred_order("attention") == ("triton", "cuda", "torch")


def test_dispatch_table_file_is_honoured(monkeypatch, tmp_path):
    path = tmp_path / "dispatch_table.json"
    path.write_text(json.dumps({"order": {"layer_norm": ["cuda", "triton"]}}))
    monkeypatch.setattr(dispatch_table, "_TABLE_PATH", str(path))
    dispatch_table._table.cache_clear()
    try:
        assert dispatch_table.preferred_order("layer_norm") == ("cuda", "triton", "torch")
        assert dispatch_table.preferred_order("attention") == ("triton", "cuda", "torch")
    finally:
        dispatch_table._table.cache_clear()


# ------------------------------------------------------------------ per-call limits


def test_layer_norm_cuda_limits():
    from fastlm.ops.layer_norm import _cuda
    from fastlm.ops.layer_norm.call import LayerNormCall

    assert "CUDA tensors" in _cuda.reason(
        LayerNormCall.checked(torch.randn(2, 8), None, None, 1e-5, None)
    )
    wide = LayerNormCall.checked(torch.empty(1, 20000, device="meta"), None, None, 1e-5, None)
    assert "CUDA tensors" in _cuda.reason(wide)  # the device is named first ...
    limit = _cuda_ext.LAYER_NORM_MAX_N
    assert limit == 16384  # ... the width limit comes from csrc/fastlm_limits.h


def _pretend_sm90(monkeypatch):
    monkeypatch.setattr(_cuda_ext, "capability_reason", lambda device: None)
    monkeypatch.setattr(_cuda_ext, "unavailable_reason", lambda: None)


@pytest.mark.parametrize(
    "dtype, d, dropout, expect",
    [
        (torch.float32, 64, 0.0, "float16 or bfloat16"),
        (torch.float16, 96, 0.0, "head_dim"),
        (torch.float16, 64, 0.1, "dropout"),
        (torch.float16, 64, 0.0, None),
        (torch.bfloat16, 128, 0.0, None),
    ],
)
def test_attention_cuda_limits(monkeypatch, dtype, d, dropout, expect):
    from fastlm.ops.attention import _cuda
    from fastlm.ops.attention.call import AttentionCall

    _pretend_sm90(monkeypatch)
    q = torch.zeros(1, 4, 2, d, dtype=dtype)
    call = AttentionCall.checked(
        q, q, q, causal=False, key_padding_mask=None, softmax_scale=None, dropout_p=dropout
    )
    reason = _cuda.reason(call)
    if expect is None:
        assert reason is None
    else:
        assert expect in reason


def test_attention_cuda_alignment(monkeypatch):
    from fastlm.ops.attention import _cuda
    from fastlm.ops.attention.call import AttentionCall

    _pretend_sm90(monkeypatch)
    q = torch.zeros(1, 4, 3, 64 + 4, dtype=torch.float16)[..., :64]  # head stride 68
    call = AttentionCall.checked(
        q, q, q, causal=False, key_padding_mask=None, softmax_scale=None, dropout_p=0.0
    )
    assert "16-byte" in _cuda.reason(call)


def test_attention_cuda_needs_cuda_tensor():
    from fastlm.ops.attention import _cuda
    from fastlm.ops.attention.call import AttentionCall

    q = torch.zeros(1, 4, 2, 64, dtype=torch.float16)
    call = AttentionCall.checked(
        q, q, q, causal=False, key_padding_mask=None, softmax_scale=None, dropout_p=0.0
    )
    assert "CUDA tensors" in _cuda.reason(call)


def test_limits_table_matches_the_header():
    """fastlm/_cuda_ext reads csrc/fastlm_limits.h: the values the binding checks."""
    import os

    with open(os.path.join(_cuda_ext.csrc_dir(), "fastlm_limits.h")) as f:
        header = f.read()
    assert f"kLayerNormMaxN = {_cuda_ext.LAYER_NORM_MAX_N};" in header
    dims = ", ".join(map(str, _cuda_ext.ATTENTION_HEAD_DIMS))
    assert f"kAttentionHeadDims[] = {{{dims}}};" in header
    assert f"kMaxGridYZ = {_cuda_ext.MAX_GRID_YZ};" in header


# ------------------------------------------------------------------ table generation


def test_make_dispatch_table(tmp_path):
    from benchmarks import make_dispatch_table as mdt

    gpu = tmp_path / "h100"
    gpu.mkdir()
    rows = []
    for n in (1024, 4096):
        rows += [
            {"op": "layer_norm", "impl": "fastlm-triton", "dtype": "fp16", "N": n, "ms": 0.02},
            {"op": "layer_norm", "impl": "fastlm-cuda", "dtype": "fp16", "N": n, "ms": 0.01},
            {"op": "attention", "impl": "fastlm-triton", "dtype": "fp16", "N": n, "ms": 1.0},
            {"op": "attention", "impl": "fastlm-cuda", "dtype": "fp16", "N": n, "ms": 1.5},
            {"op": "attention", "impl": "torch", "dtype": "fp16", "N": n, "ms": 0.1},
        ]
    rows.append({"op": "linear_gelu", "impl": "fastlm-cuda", "ms": 0.1})  # unpaired: ignored
    (gpu / "x.json").write_text(json.dumps({"environment": {}, "rows": rows}))
    out = tmp_path / "table.json"
    table = mdt.main(["--results", str(tmp_path), "--write", "--out", str(out)])
    assert table["order"] == {
        "attention": ["triton", "cuda", "torch"],
        "layer_norm": ["cuda", "triton", "torch"],
    }
    assert json.loads(out.read_text())["order"] == table["order"]
    with pytest.raises(SystemExit, match="no paired"):
        mdt.main(["--results", str(tmp_path / "empty"), "--write", "--out", str(out)])


# ------------------------------------------------------------------ ffn and kv-cache on cuda


def _ffn_args():
    x = torch.randn(3, 8)
    return x, torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)


@pytest.mark.parametrize(
    "op, call",
    [
        ("linear_gelu", lambda x, w1, b1, w2, b2: fastlm.linear_gelu(x, w1, b1, backend="cuda")),
        (
            "gelu_ffn",
            lambda x, w1, b1, w2, b2: fastlm.gelu_ffn(
                x, w1, b1, w2, b2, residual=x, backend="cuda"
            ),
        ),
    ],
)
def test_forced_cuda_ffn_on_cpu_tensor_raises(op, call):
    with pytest.raises(backends.BackendUnavailableError) as info:
        call(*_ffn_args())
    msg = str(info.value)
    assert f"fastlm.{op}" in msg and "'cuda'" in msg and "CUDA tensors" in msg


def _decode_args(dtype=torch.float16, d=64, heads=4):
    q = torch.randn(2, 1, heads, d, dtype=dtype)
    kc = torch.randn(2, 16, 2, d, dtype=dtype)
    return q, kc, torch.randn_like(kc), torch.tensor([3, 7], dtype=torch.int32)


def test_forced_cuda_kvcache_on_cpu_tensor_raises():
    q, kc, vc, lens = _decode_args()
    with pytest.raises(backends.BackendUnavailableError) as info:
        fastlm.attention_with_kvcache(q, kc, vc, lens, k=kc[:, :1], v=vc[:, :1], backend="cuda")
    msg = str(info.value)
    assert "fastlm.attention_with_kvcache" in msg and "'cuda'" in msg and "CUDA tensors" in msg


@pytest.fixture
def cuda_device_ok(monkeypatch):
    """Pretend the device can run the CUDA kernels (a CUDA tensor on sm_90), so that the
    per-call limits of the op are what decides."""
    monkeypatch.setattr(backends, "_cuda_reason", lambda device: None)
    monkeypatch.setattr(_cuda_ext, "capability_reason", lambda device: None)


@pytest.mark.parametrize(
    "dtype, d, heads, expect",
    [
        (torch.float32, 64, 4, "float16 or bfloat16, got float32"),
        (torch.float16, 96, 4, "head_dim (64, 128), got 96"),
        (torch.bfloat16, 64, 65536 * 2, "heads <= 65535"),
    ],
)
def test_kvcache_cuda_limits_name_the_reason(cuda_device_ok, dtype, d, heads, expect):
    q, kc, vc, lens = _decode_args(dtype, d)
    if heads != 4:  # more query heads than a CUDA grid dimension holds (GQA over 2 kv heads)
        q = torch.zeros(2, 1, heads, d, dtype=dtype)
    with pytest.raises(backends.BackendUnavailableError, match="cannot serve") as info:
        fastlm.attention_with_kvcache(q, kc, vc, lens, backend="cuda")
    assert expect in str(info.value)


def test_kvcache_cuda_limits_alignment(cuda_device_ok):
    q, _, _, lens = _decode_args()
    kc = torch.randn(2, 16, 2, 64 + 4, dtype=torch.float16)[..., :64]  # head stride 68
    with pytest.raises(
        backends.BackendUnavailableError, match="needs k_cache with 16-byte aligned"
    ):
        fastlm.attention_with_kvcache(q, kc, kc, lens, backend="cuda")


@needs_no_ext
def test_kvcache_cuda_in_limits_reports_missing_extension(cuda_device_ok):
    """A call within the kernels' limits gets as far as loading them: the reason is then
    the missing extension, not a limit."""
    q, kc, vc, lens = _decode_args(torch.bfloat16, 128)
    with pytest.raises(backends.BackendUnavailableError, match=r"fastlm\._C is not built"):
        fastlm.attention_with_kvcache(q, kc, vc, lens, backend="cuda")


# ------------------------------------------------------------------ the cuda branches, on CPU
#
# The cuda branches of fastlm.ops.ffn and fastlm.ops.attention_kvcache cannot run here. To
# test their wiring (which kernel gets which operand, shapes, the stored pre-activation,
# the appended lengths) the extension is replaced by _ContractOps: the same Python API as
# fastlm._cuda_ext._Ops, computed by fastlm.reference in fp32, and refusing every input the
# binding (csrc/binding.cpp) would refuse. tests/csrc/test_cuda_ops.py runs the real
# kernels on a GPU.


class _ContractOps:
    def __init__(self):
        self.calls: list[str] = []

    @staticmethod
    def _rows(op, name, t, like=None):
        assert t.dim() == 2, f"{op}: {name} must be 2-D (rows, features), got {tuple(t.shape)}"
        assert t.shape[-1] <= 1 or t.stride(-1) == 1, f"{op}: {name} last dim not contiguous"
        assert t.dtype in (torch.float32, torch.float16, torch.bfloat16), f"{op}: {name} dtype"
        if like is not None:
            assert t.shape == like.shape and t.dtype == like.dtype, f"{op}: {name} vs first"

    @staticmethod
    def _bias(op, bias, x):
        if bias is not None:
            assert bias.shape == (x.shape[-1],), f"{op}: bias shape {tuple(bias.shape)}"

    @staticmethod
    def _mode(op, approximate):
        assert approximate in ("none", "tanh"), f"{op}: approximate {approximate!r}"

    def bias_gelu(self, x, bias, approximate="none", store_preact=False):
        self.calls.append("bias_gelu")
        self._rows("bias_gelu", "x", x)
        self._bias("bias_gelu", bias, x)
        self._mode("bias_gelu", approximate)
        h = (x.float() + (0 if bias is None else bias.float())).to(x.dtype)
        y = ref_ffn.gelu(x.float() + (0 if bias is None else bias.float()), approximate)
        return y.to(x.dtype), (h if store_preact else None)

    def gelu_bwd(self, dy, h, approximate="none"):
        self.calls.append("gelu_bwd")
        self._rows("gelu_bwd", "h", h)
        self._rows("gelu_bwd", "dy", dy, like=h)
        self._mode("gelu_bwd", approximate)
        return (dy.float() * ref_ffn.gelu_grad(h.float(), approximate)).to(h.dtype)

    def bias_residual_add(self, x, bias, residual):
        self.calls.append("bias_residual_add")
        self._rows("bias_residual_add", "x", x)
        self._rows("bias_residual_add", "residual", residual, like=x)
        self._bias("bias_residual_add", bias, x)
        y = x.float() + residual.float() + (0 if bias is None else bias.float())
        return y.to(x.dtype)

    def attention_decode(self, q, k_cache, v_cache, cache_seqlens, softmax_scale, causal=True):
        self.calls.append("attention_decode")
        assert q.dim() == 4 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
        assert q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128)
        assert k_cache.shape[0] == q.shape[0] and q.shape[2] % k_cache.shape[2] == 0
        assert cache_seqlens.dtype == torch.int32 and cache_seqlens.is_contiguous()
        assert cache_seqlens.shape == (q.shape[0],)
        # The kernel clamps each length to [0, S_cache]; so does masking with j < length.
        out = ref_kv.kvcache_attention(q, k_cache, v_cache, cache_seqlens, causal, softmax_scale)
        return out, None  # the op ignores lse: None makes any use of it fail loudly


@pytest.fixture
def contract_ext(monkeypatch):
    ops = _ContractOps()
    monkeypatch.setattr(backends, "_cuda_reason", lambda device: None)
    monkeypatch.setattr(_cuda_ext, "capability_reason", lambda device: None)
    monkeypatch.setattr(_cuda_ext, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_cuda_ext, "module", lambda: ops)
    from fastlm.ops.ffn import _cuda as ffn_cuda

    monkeypatch.setattr(ffn_cuda, "reason", lambda call: None)  # CPU tensors, fake kernels
    return ops


def _grads(fn, inputs, dy):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, present, dy)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_linear_gelu_cuda_wiring(contract_ext, approximate, bias, dtype):
    x = torch.randn(3, 5, 24).to(dtype)
    w = (torch.randn(40, 24) * 0.2).to(dtype).t().contiguous().t()  # strided (Conv1D) view
    b = torch.randn(40).to(dtype) if bias else None
    dy = torch.randn(3, 5, 40).to(dtype)
    got, g_got = _grads(
        lambda *t: fastlm.linear_gelu(*t, approximate=approximate, backend="cuda"), (x, w, b), dy
    )
    want, g_want = _grads(
        lambda *t: fastlm.linear_gelu(*t, approximate=approximate, backend="torch"), (x, w, b), dy
    )
    assert contract_ext.calls == ["bias_gelu", "gelu_bwd"]
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for g, gw in zip(g_got, g_want):
        torch.testing.assert_close(g, gw, **tol)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_ffn_cuda_wiring(contract_ext, residual, bias):
    x = torch.randn(17, 16)
    w1, w2 = torch.randn(48, 16) * 0.25, torch.randn(12, 48) * 0.15
    b1, b2 = (torch.randn(48), torch.randn(12)) if bias else (None, None)
    r = torch.randn(17, 12) if residual else None
    dy = torch.randn(17, 12)

    def run(backend):
        return lambda x, w1, b1, w2, b2, r: fastlm.gelu_ffn(
            x, w1, b1, w2, b2, approximate="tanh", residual=r, backend=backend
        )

    got, g_got = _grads(run("cuda"), (x, w1, b1, w2, b2, r), dy)
    want, g_want = _grads(run("torch"), (x, w1, b1, w2, b2, r), dy)
    expect = ["bias_gelu", *(["bias_residual_add"] if residual else []), "gelu_bwd"]
    assert contract_ext.calls == expect
    torch.testing.assert_close(got, want)
    for g, gw in zip(g_got, g_want):
        torch.testing.assert_close(g, gw)


def test_linear_gelu_cuda_expanded_grad_and_inference(contract_ext):
    x, w, b = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8), torch.randn(10)
    fastlm.linear_gelu(x, w, b, backend="cuda").sum().backward()  # dy has strides (0, 0)
    xr = x.detach().clone().requires_grad_()
    fastlm.linear_gelu(xr, w, b, backend="torch").sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    with torch.no_grad():
        y = fastlm.linear_gelu(x, w, b, backend="cuda")
    torch.testing.assert_close(y, ref_ffn.linear_gelu(x.detach(), w, b))


def test_ffn_cuda_backward_recomputes_missing_pre_activation(contract_ext):
    from fastlm.ops.ffn import _op as ffn_op

    x, w, b, dy = torch.randn(5, 8), torch.randn(10, 8), torch.randn(10), torch.randn(5, 10)
    missing = x.new_empty((0,))
    got = ffn_op.linear_gelu_bwd(dy, x, w, b, missing, "none", True, True, True, "cuda")
    want = ffn_op.linear_gelu_bwd(dy, x, w, b, missing, "none", True, True, True, "reference")
    for g, gw in zip(got, want):
        torch.testing.assert_close(g, gw)


@pytest.mark.parametrize("append", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_cuda_wiring(contract_ext, append, causal):
    q = torch.randn(3, 2, 4, 64).half()
    kc = torch.randn(3, 12, 2, 64).half()
    vc = torch.randn_like(kc)
    k, v = (torch.randn(3, 2, 2, 64).half() for _ in range(2)) if append else (None, None)
    lens = torch.tensor([0, 5, 10], dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    got = fastlm.attention_with_kvcache(q, kc, vc, lens, k=k, v=v, causal=causal, backend="cuda")
    # The stand-in computes like fastlm.reference (fp32 inside): compare with that backend.
    want = fastlm.attention_with_kvcache(
        q, kc2, vc2, lens, k=k, v=v, causal=causal, backend="reference"
    )
    assert contract_ext.calls == ["attention_decode"]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(kc, kc2, rtol=0, atol=0)  # appended identically
    torch.testing.assert_close(vc, vc2, rtol=0, atol=0)
    assert lens.tolist() == [0, 5, 10], "cache_seqlens must not be advanced"


def test_kvcache_cuda_out_of_range_lengths_give_nan(contract_ext):
    from fastlm.ops.attention_kvcache._op import attention_with_kvcache_op

    q = torch.randn(3, 1, 2, 64).half()
    kc = torch.randn(3, 8, 2, 64).half()
    vc, new = torch.randn_like(kc), torch.randn(3, 1, 2, 64).half()
    kc0 = kc.clone()
    lens = torch.tensor([-1, 8, 4], dtype=torch.int32)  # bad, bad (no room), ok
    out = attention_with_kvcache_op(q, kc, vc, lens, new, new, True, 0.125, "cuda")
    assert torch.isnan(out[:2]).all() and not torch.isnan(out[2]).any()
    torch.testing.assert_close(kc[:2], kc0[:2], rtol=0, atol=0)


def test_peek_reason_never_builds(monkeypatch):
    """`python -m fastlm info` describes the CUDA backend without starting the JIT build."""
    from fastlm import _cuda_ext

    monkeypatch.setattr(_cuda_ext, "_state", None)
    monkeypatch.setattr(_cuda_ext, "_jit_build", lambda: pytest.fail("peek_reason started a build"))
    reason = _cuda_ext.peek_reason()
    assert reason is not None and "not built" in reason
