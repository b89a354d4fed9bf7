"""Which implementation serves a call.

Four backends:

* ``triton``    — the fused kernels in ``fastlm.kernels``. Default on CUDA tensors. On CPU
  tensors it runs only through the Triton interpreter (``TRITON_INTERPRET=1`` set before
  the kernels are imported); that is how CI exercises the real kernels.
* ``cuda``      — the hand-written CUDA C++ kernels in ``csrc/`` (``fastlm._C`` or the JIT
  build).
* ``torch``     — PyTorch's fastest composite ops (SDPA, F.layer_norm, addmm + gelu), with
  PyTorch's own autograd. Default on CPU tensors; the fallback on CUDA.
* ``reference`` — ``fastlm.reference``, the clear fp32/fp64 oracle the tests compare
  against. Slow; never chosen automatically, only by name (for debugging).

Choice order: the ``backend=`` argument, then :func:`set_backend`, then the
``FASTLM_BACKEND`` environment variable, then automatic. A backend chosen explicitly that
cannot serve a call raises :class:`BackendUnavailableError` naming why; an automatic choice
falls back to the next backend and logs the reasons once. Each op folder
(``fastlm/ops/<op>/``) holds one module per backend whose ``reason(call)`` declares all of
that backend's limits; :func:`choose` only collects them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Protocol

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "choose",
    "device_reason",
    "forget_decisions",
    "get_backend",
    "set_backend",
]

BACKENDS = ("triton", "cuda", "torch", "reference")
_AUTO_NAMES = ("", "auto", "none")

logger = logging.getLogger("fastlm")
_override: str | None = None
_logged: set[tuple] = set()  # (op, backend, skipped reasons) already logged


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


# FASTLM_BACKEND is read once, when fastlm is imported (reading the environment costs
# microseconds, too much for every op call); set_backend() changes the choice at run time.
_ENV_BACKEND = os.environ.get("FASTLM_BACKEND")


def get_backend() -> str | None:
    """The process-wide forced backend (set_backend, else FASTLM_BACKEND as it was when
    fastlm was imported), or None for the automatic choice."""
    if _override is not None:
        return _override
    return _normalize(_ENV_BACKEND, "FASTLM_BACKEND")


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
        if not interpreter_enabled():
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (the Triton interpreter runs kernels on the CPU)"
        mode = sys.modules.get("fastlm.kernels._mode")
        if mode is not None and not mode.INTERPRETED_AT_IMPORT:
            return (
                "TRITON_INTERPRET=1 was set after fastlm's Triton kernels were imported, so they "
                "were compiled for a GPU; set it before importing fastlm.kernels (or in the "
                "environment before starting Python)"
            )
        return None
    return f"triton kernels do not run on device type {device.type!r}"


def _cuda_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors, got device {device.type!r}"
    from fastlm import _cuda_ext

    return _cuda_ext.unavailable_reason()


def device_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` at all (None: it can)."""
    if backend in ("torch", "reference"):
        return None
    if backend == "triton":
        return _triton_reason(device)
    if backend == "cuda":
        return _cuda_reason(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU), the
    ``reference`` oracle included."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b for b in BACKENDS if device_reason(b, device) is None]


# ---------------------------------------------------------------------------------------
# Per-call choice.
# ---------------------------------------------------------------------------------------


class Call(Protocol):
    """What :func:`choose` needs of an op's call record (fastlm/ops/<op>/call.py)."""

    @property
    def device(self) -> torch.device: ...

    def dispatch_key(self) -> Hashable:
        """Everything the backends' reasons depend on (dtype, shape class, flags,
        alignment): calls with equal keys get the same backend, decided once."""
        ...


class Backend(Protocol):
    """One backend of one op (fastlm/ops/<op>/_<backend>.py)."""

    def reason(self, call: Any) -> str | None:
        """Why this backend cannot serve ``call`` (None: it can). ALL its limits live here."""
        ...


def _automatic_order(op: str, device: torch.device) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("torch",)
    from fastlm import dispatch_table

    return dispatch_table.preferred_order(op)


def _reason(op_backends: Mapping[str, Backend], name: str, call: Call) -> str | None:
    if name not in op_backends:
        return "this op has no implementation on that backend"
    return device_reason(name, call.device) or op_backends[name].reason(call)


def _decide(op: str, call: Call, op_backends: Mapping[str, Backend], explicit: str | None) -> str:
    where = f"fastlm.{op}"
    if explicit is not None:
        r = _reason(op_backends, explicit, call)
        if r is not None:
            raise BackendUnavailableError(
                f"{where}: backend {explicit!r} cannot serve this call: {r}"
            )
        return explicit
    skipped = []
    for name in _automatic_order(op, call.device):
        r = _reason(op_backends, name, call)
        if r is None:
            if skipped and (key := (op, name, tuple(skipped))) not in _logged:
                _logged.add(key)
                logger.info(
                    "%s: using backend %r; skipped %s",
                    where,
                    name,
                    "; ".join(f"{b!r}: {why}" for b, why in skipped),
                )
            return name
        skipped.append((name, r))
    # The torch backend serves every call; reaching here means an op lacks one.
    raise BackendUnavailableError(
        f"{where}: no backend can serve this call: "
        + "; ".join(f"{b!r}: {why}" for b, why in skipped)
    )


_DECISIONS: dict[Hashable, str] = {}
_MAX_DECISIONS = 4096


def choose(
    op: str, call: Call, op_backends: Mapping[str, Backend], requested: str | None = None
) -> str:
    """The backend that serves ``call`` of ``op``.

    ``op_backends`` maps backend names to the op's backend modules, each with
    ``reason(call)``. An explicit choice (``requested``, else :func:`set_backend`, else
    ``FASTLM_BACKEND``) that cannot serve the call raises :class:`BackendUnavailableError`
    with its reason; an automatic one takes the first backend in the device's order that
    can, logging the reasons of those it skipped once. The decision is remembered per
    (op, explicit choice, ``call.dispatch_key()``), so the hot path pays one dict lookup;
    under torch.compile it is taken at trace time only.
    """
    if requested is None:
        forced = _override if _override is not None else _ENV_BACKEND
    elif type(requested) is str:
        forced = requested
    else:
        forced = _normalize(requested, f"fastlm.{op}")  # raises: not a string
    if torch.compiler.is_compiling():
        return _decide(op, call, op_backends, _explicit(op, requested, forced))
    # Keyed by the raw request: the hot path normalizes nothing; a miss does it once.
    key = (op, forced, call.dispatch_key())
    chosen = _DECISIONS.get(key)
    if chosen is None:
        chosen = _decide(op, call, op_backends, _explicit(op, requested, forced))
        if len(_DECISIONS) >= _MAX_DECISIONS:
            _DECISIONS.clear()
        _DECISIONS[key] = chosen
    return chosen


def _explicit(op: str, requested: str | None, forced: str | None) -> str | None:
    """The normalized explicit choice; errors name where the bad name came from."""
    if requested is not None:
        return _normalize(requested, f"fastlm.{op}")
    if forced is _ENV_BACKEND:
        return _normalize(forced, "FASTLM_BACKEND")
    return forced  # set_backend() normalized it already


def forget_decisions() -> None:
    """Drop remembered choices (after something they depend on changed: a CUDA extension
    built or reset, TRITON_INTERPRET toggled in tests)."""
    _DECISIONS.clear()
    _logged.clear()


def native_runs(op_backends: Mapping[str, Backend]) -> dict[str, Callable]:
    """``{name: run}`` of an op's backends that run with PyTorch's own autograd (``NATIVE``:
    no custom op); an op calls ``run(call)`` of the chosen one directly, else its custom op.
    Built once per op at import, so the hot path pays one dict lookup."""
    return {name: b.run for name, b in op_backends.items() if getattr(b, "NATIVE", False)}
