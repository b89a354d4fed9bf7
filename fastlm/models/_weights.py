"""Derived weights (a fused QKV matrix, a transposed Conv1D weight) computed once for inference.

Why a cache and when: BERT keeps HF's three ``query``/``key``/``value`` Linear layers (so
state_dict, load_state_dict and optimizers see exactly HF's parameters) but one GEMM over
the concatenated (3H, H) weight is faster than three. Concatenating at every call copies
the weights; for inference we keep the concatenation and rebuild it only when a source
tensor changes. "Changes" is tracked by identity, storage pointer, dtype, device and the
autograd version counter, which every in-place update bumps (optimizer steps,
load_state_dict's copy_, ``.data`` edits through torch ops).

When autograd is recording and a source requires grad (training), the derivation is
recomputed every call so gradients flow back to the HF-named parameters; its cost is one
weight-sized copy, small next to the activation GEMM it feeds. Correctness first.

Under an initialized torch.distributed process group nothing is cached either: FSDP2
(``fully_shard``) gathers the updated shards into the *same* unsharded parameter before each
forward and hides that write from the version counter on purpose
(``torch.autograd._unsafe_preserve_version_counter`` in torch/distributed/fsdp/_fully_shard),
so only the storage address could reveal it, and an allocator may hand the same address back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _key(ts: Sequence[torch.Tensor | None]) -> tuple:
    return tuple(
        None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
        for t in ts
    )


def writes_may_be_hidden() -> bool:
    """Whether parameters may be rewritten in place without a version bump: under a
    process group, where FSDP2 and other parameter-sharding wrappers run (module docstring)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class DerivedWeight:
    """``DerivedWeight(fn)(*sources)`` returns ``fn(*sources)``, cached while sources are unchanged
    and no gradient is being recorded for them. Not a buffer: never in state_dict."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, *sources: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced into the graph: the cache's identity/version key is host state dynamo
            # would guard on (a recompile per weight update) and the graph recomputes it anyway.
            return self.fn(*sources)
        if writes_may_be_hidden() or (
            torch.is_grad_enabled() and any(s is not None and s.requires_grad for s in sources)
        ):
            self._key = self._value = None  # do not pin memory of a stale inference copy
            return self.fn(*sources)
        key = _key(sources)
        if key != self._key or self._value is None:
            with torch.no_grad():
                self._value = self.fn(*sources)
            self._key = key
        return self._value
