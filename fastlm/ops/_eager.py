"""When an op may call its kernel directly instead of through its custom op.

The custom ops (torch.library) exist for autograd and for tracing: torch.compile, export,
fake tensors. An eager call that records no autograd graph needs neither, and the
dispatcher round trip is pure overhead on the hot path (about 20 µs a call on a CPU, more
than a decode step's kernels on a GPU; see benchmarks/bench_overhead.py). Such calls go
straight to the backend's forward, the same code the custom op runs; everything else keeps
the custom op.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def direct(*tensors: torch.Tensor | None) -> bool:
    """True when calling the kernel directly is equivalent to calling the custom op: not
    tracing or compiling, no dispatch mode active (fake tensors, functionalization ...),
    only plain tensors (no subclass: DTensor, FakeTensor ...), and no autograd to record."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True
