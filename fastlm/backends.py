"""Which implementation serves a call.

Three backends:

* ``triton`` — the fused kernels in ``fastlm.kernels``. Default on CUDA tensors. On CPU
  tensors it runs only through the Triton interpreter (``TRITON_INTERPRET=1`` set before
  ``import triton``); that is how CI exercises the real kernels.
* ``cuda``   — the hand-written CUDA C++ kernels in ``csrc/`` (``fastlm._C`` or the JIT build).
* ``torch``  — ``fastlm.reference``: plain PyTorch, fp32 internally. Default on CPU tensors.

Choice order: the ``backend=`` argument, then :func:`set_backend`, then the
``FASTLM_BACKEND`` environment variable, then automatic. A backend chosen explicitly that
cannot serve a call raises :class:`BackendUnavailableError` naming why; an automatic choice
falls back to the next backend and logs the reason once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "choose",
    "device_reason",
    "get_backend",
    "set_backend",
]

BACKENDS = ("triton", "cuda", "torch")
_AUTO_NAMES = ("", "auto", "none")

logger = logging.getLogger("fastlm")
_override: str | None = None
_logged: set[tuple[str, str, str]] = set()


class BackendUnavailableError(NotImplementedError):
    """An explicitly requested backend cannot serve this call."""


def _normalize(name: str | None, where: str) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{where}: backend must be a string or None, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _AUTO_NAMES:
        return None
    if key not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {BACKENDS} or None")
    return key


def set_backend(name: str | None) -> None:
    """Force a backend for every op (``None`` restores the automatic choice)."""
    global _override
    _override = _normalize(name, "fastlm.set_backend")


def get_backend() -> str | None:
    """The process-wide forced backend (set_backend, else FASTLM_BACKEND), or None for auto."""
    if _override is not None:
        return _override
    return _normalize(os.environ.get("FASTLM_BACKEND"), "FASTLM_BACKEND")


# ---------------------------------------------------------------------------------------
# Device-level capability: can this backend run anything at all on this device?
# ---------------------------------------------------------------------------------------


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"triton is not importable ({exc.__class__.__name__}: {exc})"
    return None


def _triton_reason(device: torch.device) -> str | None:
    if (err := _triton_import_error()) is not None:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 was not set before importing triton"
    return f"triton kernels do not run on device type {device.type!r}"


def _cuda_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors, got device {device.type!r}"
    from fastlm import _cuda_ext

    return _cuda_ext.unavailable_reason()


def device_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` at all (None: it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device)
    if backend == "cuda":
        return _cuda_reason(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b for b in BACKENDS if device_reason(b, device) is None]


# ---------------------------------------------------------------------------------------
# Per-call choice.
# ---------------------------------------------------------------------------------------


def _automatic_order(op: str, device: torch.device) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("torch",)
    from fastlm import dispatch_table

    return dispatch_table.preferred_order(op)


def choose(
    op: str,
    device: torch.device,
    requested: str | None = None,
    limits: Mapping[str, str | None] | Callable[[str], str | None] | None = None,
) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``limits`` gives, per backend, the op-specific reason it cannot serve this call (for
    example a head_dim it was not compiled for), or None when it can.
    """
    where = f"fastlm.{op}"
    explicit = _normalize(requested, where) if requested is not None else get_backend()

    def reason(b: str) -> str | None:
        r = device_reason(b, device)
        if r is None and limits is not None:
            r = limits(b) if callable(limits) else limits.get(b)
        return r

    if explicit is not None:
        r = reason(explicit)
        if r is not None:
            raise BackendUnavailableError(
                f"{where}: backend {explicit!r} cannot serve this call: {r}"
            )
        return explicit

    for b in _automatic_order(op, device):
        r = reason(b)
        if r is None:
            return b
        key = (op, b, r)
        if key not in _logged:
            _logged.add(key)
            logger.info("%s: skipping backend %r: %s", where, b, r)
    return "torch"
