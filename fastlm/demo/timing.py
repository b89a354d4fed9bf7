"""Wall-clock medians for the demo: small on purpose, so a reader can check it in a minute.

The installed package cannot use the repository's ``benchmarks/`` harness (it is not
installed), and ``fastlm.bench`` times single ops with ``torch.utils.benchmark``; the
demo times whole model calls of tens of milliseconds to seconds, where a handful of runs
is all a user will wait for.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _sync(device: torch.device) -> None:
    # CUDA calls return before the GPU finishes: without this the clock measures launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    calls: Mapping[str, Callable[[], object]], runs: int, device: torch.device
) -> tuple[dict[str, object], dict[str, float]]:
    """Each call's result and its median milliseconds over ``runs`` timed runs.

    The result comes from one untimed warm-up call (first-call caches, lazy initialisation,
    the allocator), so checking it costs no extra run.

    The calls are timed round-robin (one run of each, then the next round) rather than one
    after the other, so a slow spell of a shared machine hits every call alike and the
    ratios between them stay fair.
    """
    if runs < 1:
        raise ValueError(f"time_calls: runs must be >= 1, got {runs}")
    results = {name: call() for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return results, {name: statistics.median(ms) for name, ms in times.items()}
