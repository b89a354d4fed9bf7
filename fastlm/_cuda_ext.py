"""The CUDA C++ backend: finding, building and calling the csrc/ kernels.

Where the kernels come from, in order:

1. an ahead-of-time build, ``fastlm._C`` (``FASTLM_BUILD_CUDA=1 pip install
   --no-build-isolation .``, see setup.py), loaded with ``torch.ops.load_library``;
2. otherwise a JIT build: ``torch.utils.cpp_extension.load`` compiles csrc/ (the installed
   ``fastlm.csrc`` directory) with ninja into ``$FASTLM_CUDA_CACHE`` (default
   ``~/.cache/fastlm/cuda/torch<version>-cu<version>``), C++20, for the archs in
   ``TORCH_CUDA_ARCH_LIST`` or else the visible GPUs' (torch's own rule). The build runs
   once, the first time the cuda backend is considered for CUDA tensors (an explicit
   ``backend="cuda"``, or an automatic choice reaching ``cuda``; ``available_backends("cuda")``
   also counts), takes a few minutes, and is reused afterwards. ``FASTLM_CUDA_JIT=0``
   disables it (then only the AOT build is used).

When neither works (CPU-only torch, no GPU, no nvcc/ninja, a failed build) the backend is
unavailable: :func:`unavailable_reason` says why, an explicit ``backend="cuda"`` raises
``BackendUnavailableError`` with that reason, and automatic dispatch moves on to the next
backend. Nothing is built or imported at ``import fastlm`` time.

Python API of :func:`module` (all tensors on one CUDA device; ``(M, N)`` means any leading
dims are flattened by the caller, last dim contiguous):

``layer_norm_fwd(x, residual, weight, bias, eps) -> (y, z or None, mean, rstd)``
    x, residual: (M, N) fp32/fp16/bf16, N <= 16384; weight, bias: (N,) or None;
    z = x + residual (None without residual); mean, rstd: (M,) fp32.
``layer_norm_bwd(dy, dz_extra, z, weight, mean, rstd, need_dw, need_db)
-> (dz, dweight fp32 or None, dbias fp32 or None)``
``bias_gelu(x, bias, approximate="none", store_preact=False) -> (y, h or None)``
    y = gelu(x + bias) for x (..., N); h = x + bias in x's dtype (for the backward).
``gelu_bwd(dy, h, approximate="none") -> dh``   dh = dy * gelu'(h)
``bias_residual_add(x, bias, residual) -> y``   y = x + bias + residual
``attention(q, k, v, key_padding_mask, softmax_scale, causal=False) -> (o, lse)``
    q (B, Sq, H, D), k/v (B, Sk, Hkv, D), fp16/bf16, D in {64, 128}; mask bool (B, Sk),
    True = attend; causal aligned bottom-right; o (B, Sq, H, D), lse (B, H, Sq) fp32,
    +inf (and o = 0) for rows that see no key.
``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
softmax_scale, causal=False) -> (o, lse)``
    q (total_q, H, D), k/v (total_k, Hkv, D), cu_seqlens int32 (B + 1,) contiguous and
    valid (the kernel reads them unclamped); lse (H, total_q).
``attention_decode(q, k_cache, v_cache, cache_seqlens, softmax_scale, causal=True)
-> (o, lse)``
    q (B, Sq, H, D), caches (B, S_cache, Hkv, D), cache_seqlens int32 (B,) = valid keys per
    sequence (new keys already written); split-KV, no host sync.

These are forward kernels: the ops in fastlm.ops keep autograd (the backward of
attention runs on the Triton or torch backend).
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import threading

import torch

logger = logging.getLogger("fastlm")


def _read_limits(path: str) -> dict[str, int | tuple[int, ...]]:
    """The ``inline constexpr int kName = value;`` (or ``kName[] = {...};``) lines of
    csrc/fastlm_limits.h, the one table of the kernels' limits that the binding checks too."""
    with open(path) as f:
        text = f.read()
    limits: dict[str, int | tuple[int, ...]] = {}
    for name, array, value in re.findall(
        r"inline constexpr int (k\w+)(\[\])?\s*=\s*\{?([-\d,\s]+)\}?;", text
    ):
        numbers = tuple(int(v) for v in value.replace(",", " ").split())
        limits[name] = numbers if array else numbers[0]
    return limits


def csrc_dir() -> str:
    """The CUDA sources: the installed ``fastlm.csrc`` package, else the repository's csrc/."""
    spec = importlib.util.find_spec("fastlm.csrc")
    if spec is not None and spec.submodule_search_locations:
        for path in spec.submodule_search_locations:
            if os.path.exists(os.path.join(path, "binding.cpp")):
                return path
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


LIMITS = _read_limits(os.path.join(csrc_dir(), "fastlm_limits.h"))
LAYER_NORM_MAX_N: int = LIMITS["kLayerNormMaxN"]
ATTENTION_HEAD_DIMS: tuple[int, ...] = LIMITS["kAttentionHeadDims"]
MAX_GRID_YZ: int = LIMITS["kMaxGridYZ"]
ATTENTION_MIN_CAPABILITY: tuple[int, int] = divmod(LIMITS["kAttentionMinCapability"], 10)
OPERAND_ALIGN_BYTES: int = LIMITS["kOperandAlignBytes"]

_lock = threading.Lock()
_state: tuple[object | None, str | None] | None = None


def _cache_dir() -> str:
    base = os.environ.get("FASTLM_CUDA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastlm", "cuda"
    )
    return os.path.join(base, f"torch{torch.__version__}-cu{torch.version.cuda}".replace("+", "_"))


def _try_aot() -> str | None:
    """Load fastlm._C's operators; None on success, else why not."""
    spec = importlib.util.find_spec("fastlm._C")
    if spec is None or not spec.origin:
        return "the AOT extension fastlm._C is not built"
    torch.ops.load_library(spec.origin)
    return None


def _jit_prerequisites() -> str | None:
    if os.environ.get("FASTLM_CUDA_JIT", "1").strip() in ("0", "false", "no", "off"):
        return "fastlm._C is not built and FASTLM_CUDA_JIT=0 disables the JIT build"
    if torch.version.cuda is None:
        return (
            f"this torch build ({torch.__version__}) has no CUDA support, so csrc/ cannot be built"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return (
            "no CUDA toolkit found for the JIT build (set CUDA_HOME to a directory with bin/nvcc)"
        )
    if not cpp_extension.is_ninja_available():
        return "the JIT build of csrc/ needs ninja (pip install ninja)"
    return None


def _jit_build() -> None:
    from torch.utils import cpp_extension

    src = csrc_dir()
    sources = [os.path.join(src, "binding.cpp"), *sorted(glob.glob(os.path.join(src, "*.cu")))]
    build_dir = _cache_dir()
    os.makedirs(build_dir, exist_ok=True)
    logger.warning(
        "fastlm: building the CUDA kernels in %s (first use only, a few minutes)", build_dir
    )
    cpp_extension.load(
        name="fastlm_cuda_jit",
        sources=sources,
        extra_include_paths=[src],
        extra_cflags=["-O3", "-std=c++20"],
        extra_cuda_cflags=["-O3", "-std=c++20", "-lineinfo"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("FASTLM_CUDA_VERBOSE", "0") == "1",
    )


def _load() -> tuple[object | None, str | None]:
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        aot = _try_aot()
        if aot is None:
            _state = (_Ops(), None)
            return _state
        reason = _jit_prerequisites()
        if reason is None:
            try:
                _jit_build()
            except Exception as exc:  # a compiler error: report it, fall back to other backends
                tail = str(exc).strip().splitlines()[-3:]
                reason = (
                    f"the JIT build of csrc/ failed ({exc.__class__.__name__}: {' | '.join(tail)})"
                )
                logger.warning("fastlm: %s", reason)
        _state = (_Ops(), None) if reason is None else (None, f"{aot}; {reason}")
        return _state


def peek_reason() -> str | None:
    """Like unavailable_reason, but never starts the JIT build: for reports such as
    ``python -m fastlm info``. A build that has not run yet is described, not attempted."""
    if _state is not None:
        return _state[1]
    if importlib.util.find_spec("fastlm._C") is not None:
        return None
    reason = _jit_prerequisites()
    if reason is not None:
        return f"the AOT extension fastlm._C is not built; {reason}"
    return (
        "not built yet: the JIT build of csrc/ runs on first use of backend='cuda' (minutes, once)"
    )


def unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run at all (None: it is loaded). May trigger the JIT build."""
    return _load()[1]


def module() -> _Ops:
    mod, reason = _load()
    if mod is None:
        raise RuntimeError(f"fastlm CUDA backend unavailable: {reason}")
    return mod


# ------------------------------------------------------------------ shared limit checks
# Each op's fastlm/ops/<op>/_cuda.py declares that op's limits with these and LIMITS.


def capability_reason(device: torch.device) -> str | None:
    """Why the attention kernels cannot run on ``device`` (CUDA, sm_80 or newer)."""
    if device.type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors, got device {device.type!r}"
    capability = torch.cuda.get_device_capability(device)
    if capability < ATTENTION_MIN_CAPABILITY:
        need = ".".join(map(str, ATTENTION_MIN_CAPABILITY))
        return (
            f"the CUDA attention kernels need compute capability >= {need} (mma.sync "
            f"bf16/fp16), got {capability[0]}.{capability[1]}"
        )
    return None


def aligned(t: torch.Tensor, *, address: bool = True) -> bool:
    """Whether ``t`` suits the attention kernels' 16-byte cp.async/ldmatrix loads: every
    stride but the last a multiple of 16 bytes and (``address``) 16-byte aligned data.
    Under torch.compile pass address=False: data_ptr() cannot be traced, and the binding
    checks the address at run time anyway."""
    step = OPERAND_ALIGN_BYTES // t.element_size()
    strides_ok = all(s % step == 0 or n == 1 for s, n in zip(t.stride()[:-1], t.shape[:-1]))
    return strides_ok and (not address or t.data_ptr() % OPERAND_ALIGN_BYTES == 0)


# ------------------------------------------------------------------ the callable module


class _Ops:
    """Python face of torch.ops.fastlm_cuda (see the module docstring for signatures)."""

    @property
    def _ops(self):
        return torch.ops.fastlm_cuda

    def layer_norm_fwd(self, x, residual, weight, bias, eps):
        y, z, mean, rstd = self._ops.layer_norm_fwd(x, residual, weight, bias, float(eps))
        return y, (z if residual is not None else None), mean, rstd

    def layer_norm_bwd(self, dy, dz_extra, z, weight, mean, rstd, need_dw, need_db):
        dz, dw, db = self._ops.layer_norm_bwd(
            dy, dz_extra, z, weight, mean, rstd, bool(need_dw), bool(need_db)
        )
        return dz, (dw if need_dw else None), (db if need_db else None)

    def bias_gelu(self, x, bias, approximate="none", store_preact=False):
        rows = x.reshape(-1, x.shape[-1])
        y, h = self._ops.bias_gelu_fwd(rows, bias, approximate, bool(store_preact))
        return y.view(x.shape), (h.view(x.shape) if store_preact else None)

    def gelu_bwd(self, dy, h, approximate="none"):
        dh = self._ops.gelu_bwd(
            dy.reshape(-1, dy.shape[-1]), h.reshape(-1, h.shape[-1]), approximate
        )
        return dh.view(h.shape)

    def bias_residual_add(self, x, bias, residual):
        y = self._ops.bias_residual_add(
            x.reshape(-1, x.shape[-1]), bias, residual.reshape(-1, residual.shape[-1])
        )
        return y.view(x.shape)

    # softmax_scale is required: the default (fastlm.ops._checks.default_softmax_scale) is
    # resolved once, by the op's call record, never here.
    def attention(self, q, k, v, key_padding_mask, softmax_scale, causal=False):
        return self._ops.attention_fwd(
            q, k, v, key_padding_mask, float(softmax_scale), bool(causal)
        )

    def attention_varlen(
        self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        causal=False,
    ):  # fmt: skip
        return self._ops.attention_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
            float(softmax_scale), bool(causal),
        )  # fmt: skip

    def attention_decode(self, q, k_cache, v_cache, cache_seqlens, softmax_scale, causal=True):
        return self._ops.attention_decode(
            q, k_cache, v_cache, cache_seqlens, float(softmax_scale), bool(causal)
        )


def _reset_for_tests() -> None:
    """Forget the cached load result (tests flip FASTLM_CUDA_JIT)."""
    global _state
    with _lock:
        _state = None
