"""Loading the CUDA C++ extension (``fastlm._C``), if it was built.

The JIT build (torch.utils.cpp_extension.load over csrc/) arrives with the CUDA backend;
until then the only source is an ahead-of-time build.
"""

from __future__ import annotations

import functools


@functools.cache
def _load() -> tuple[object | None, str | None]:
    try:
        from fastlm import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the CUDA extension fastlm._C is not built ({exc})"
    return _C, None


def unavailable_reason() -> str | None:
    return _load()[1]


def module():
    mod, reason = _load()
    if mod is None:
        raise RuntimeError(reason)
    return mod


def op_reason(op: str, **call) -> str | None:
    """Why the CUDA extension cannot serve this particular call (None: it can)."""
    mod, reason = _load()
    if mod is None:
        return reason
    supports = getattr(mod, "supports", None)
    if supports is None:
        return None
    return supports(op, **call)
