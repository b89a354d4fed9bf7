"""Automatic backend order per op on CUDA tensors.

The order comes from benchmark data committed in ``benchmarks/results/`` (see
``dispatch_table.json`` beside this file when present): the faster of ``cuda`` and
``triton`` goes first. Without measurements the Triton kernels lead, the CUDA C++ kernels
follow, and the PyTorch reference is always last.
"""

from __future__ import annotations

import functools
import json
import os

_DEFAULT = ("triton", "cuda", "torch")
_TABLE_PATH = os.path.join(os.path.dirname(__file__), "dispatch_table.json")


@functools.cache
def _table() -> dict[str, list[str]]:
    if not os.path.exists(_TABLE_PATH):
        return {}
    with open(_TABLE_PATH) as f:
        data = json.load(f)
    return {op: list(order) for op, order in data.get("order", {}).items()}


def preferred_order(op: str) -> tuple[str, ...]:
    order = _table().get(op)
    if not order:
        return _DEFAULT
    rest = [b for b in _DEFAULT if b not in order]
    return (*order, *rest)
