"""fastlm: fused Triton and CUDA kernels for BERT- and GPT-style transformers.

Functional ops (``fastlm.attention``, ``fastlm.layer_norm``, ``fastlm.linear_gelu`` ...),
drop-in modules (``fastlm.nn``), Hugging Face compatible models (``fastlm.models``) and
``fastlm.optimize(hf_model)``. Names resolve lazily so ``import fastlm`` stays light and
never imports triton before the caller had a chance to set TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib

from fastlm import _source_tree

_source_tree.install()  # a checkout: fastlm.kernels / fastlm.csrc live beside fastlm/

from fastlm.backends import (  # noqa: E402  (after the finder: backends may import kernels)
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
)

__version__ = "0.1.0"

_LAZY = {
    "layer_norm": "fastlm.ops.layer_norm",
    "linear_gelu": "fastlm.ops.ffn",
    "gelu_ffn": "fastlm.ops.ffn",
    "attention": "fastlm.ops.attention",
    "attention_varlen": "fastlm.ops.attention",
    "attention_with_kvcache": "fastlm.ops.attention_kvcache",
    "unpad_input": "fastlm.ops.padding",
    "pad_input": "fastlm.ops.padding",
    "optimize": "fastlm.integrations.hf.optimize",
    "revert": "fastlm.integrations.hf.optimize",
}
_SUBMODULES = ("nn", "models", "ops", "reference", "integrations", "kernels")

__all__ = [
    "BackendUnavailableError",
    "__version__",
    "available_backends",
    "get_backend",
    "set_backend",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastlm.{name}")
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def _register_integrations() -> None:
    """Register attn_implementation="fastlm" with transformers when it is installed."""
    try:
        from fastlm.integrations.hf import register
    except ImportError:
        return
    register.register_if_available()


_register_integrations()
