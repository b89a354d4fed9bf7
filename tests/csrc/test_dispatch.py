"""Dispatch with the CUDA extension absent (every CPU machine): a forced cuda backend
raises with a readable reason, the automatic choice falls back silently, and the
dispatch table / per-call limits behave."""

from __future__ import annotations

import json

import pytest
import torch

import fastlm
from fastlm import _cuda_ext, backends, dispatch_table
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
    monkeypatch.setattr(backends, "_triton_reason", lambda device: "triton disabled for this test")
    assert backends.choose("layer_norm", torch.device("cuda")) == "torch"
    with pytest.raises(backends.BackendUnavailableError, match=r"fastlm\._C"):
        backends.choose("layer_norm", torch.device("cuda"), "cuda")


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


def test_supports_layer_norm_limits():
    assert "16384" in _cuda_ext.supports("layer_norm", n=20000)
    assert "CUDA tensors" in _cuda_ext.supports("layer_norm", x=torch.randn(2, 8), n=8)


def test_supports_gelu_modes():
    assert "approximate" in _cuda_ext.supports("linear_gelu", approximate="sigmoid")
    assert _cuda_ext.supports("gelu_ffn", approximate="tanh") is None


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
def test_supports_attention_limits(monkeypatch, dtype, d, dropout, expect):
    monkeypatch.setattr(_cuda_ext, "_capability_reason", lambda t: None)  # pretend sm_90
    q = torch.zeros(1, 4, 2, d, dtype=dtype)
    reason = _cuda_ext.supports("attention", q=q, k=q, v=q, dropout_p=dropout)
    if expect is None:
        assert reason is None
    else:
        assert expect in reason


def test_supports_attention_alignment(monkeypatch):
    monkeypatch.setattr(_cuda_ext, "_capability_reason", lambda t: None)
    q = torch.zeros(1, 4, 3, 64 + 4, dtype=torch.float16)[..., :64]  # head stride 68
    assert "16-byte" in _cuda_ext.supports("attention_with_kvcache", q=q)


def test_supports_attention_needs_cuda_tensor():
    q = torch.zeros(1, 4, 2, 64, dtype=torch.float16)
    assert "CUDA tensors" in _cuda_ext.supports("attention", q=q)


def test_supports_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        _cuda_ext.supports("softmax")


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
