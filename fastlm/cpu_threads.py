"""How many threads fastlm's layers use on a CPU whose cores another process is also using.

PyTorch's CPU ops (MKL's GEMMs, OpenMP loops) split each op evenly between the intra-op
threads and wait for the last one. When another process keeps one of the cores busy, the
thread that shares that core runs only part of the time, and every op waits for it. On this
project's 2-core machine, a stock MiniLM forward with one core busy elsewhere (medians of
7, ``benchmarks/bench_cpu_threads.py``; ``benchmarks/results/cpu/cpu_threads.md``):

=========  =====================  =====================  ====================
shape      2 threads, quiet       2 threads, busy        1 thread, busy
=========  =====================  =====================  ====================
1 x 16     19 ms                  158 ms                 19 ms
8 x 32     75 ms                  276 ms                 113 ms
32 x 128   1151 ms                2412 ms                2278 ms
=========  =====================  =====================  ====================

So with a busy neighbour, fewer threads are faster. What gives it away is cheap to read:
the process's CPU time against the wall time of fastlm's layers. Quiet, each of ``n``
threads computes or spins the whole time (utilization ``C / (n W)`` of 0.89-1.05 per
layer measured, a few single layers lower); a thread that shares its core is off it part of
the time (0.58-0.77 measured, 2 threads).

**The rule.** Each fastlm layer forward on CPU tensors runs in :meth:`Governor.scope`
(through :func:`governed`). Layers of at least :data:`MIN_WALL_S` at the user's thread
count ``n`` (``torch.get_num_threads()``, never exceeded) are summed into windows of
:data:`WINDOW_S` of wall time (one odd layer does not decide). A window in which the
process got less than ``n - SHARE`` cores' worth of CPU time (utilization 0.85 at 2
threads, between the quiet and the busy readings) is starved; :data:`STARVED_IN_A_ROW`
starved windows in a row and the following layers run at ``n - k`` threads, ``k`` the
cores' worth the window lost (at least 1). After :data:`PROBE_EVERY` such layers the next
ones run at ``n`` again until a window is full (a probe): not starved, and the user's count
is back. The setting is the process's (the neighbour is outside it) and the thread count is
set for the layer only: each scope restores the caller's count when it ends, exception or
not. Other Python threads that have run torch ops keep their own count (OpenMP's count is
per thread); one that runs its first torch op while a layer is reduced starts from the
reduced count, as from any count ``torch.set_num_threads`` set last. Costs about 2 us a
layer (two clock reads; a thread-count change is 0.4 us). Outputs agree to rounding at any
count (MKL's fp32 GEMMs here split rows and columns, not the sums, and were bit-identical
at 1 and 2 threads); ``FASTLM_CPU_THREADS=off`` where bit-identical runs across machine
loads matter.

``FASTLM_CPU_THREADS=off`` keeps the user's count always (benchmarks of the plain form);
``auto`` (the default) applies the rule. Nothing changes on other devices, under
torch.compile, or at one thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator

import torch

MODE = os.environ.get("FASTLM_CPU_THREADS", "auto")
_MODES = ("auto", "off")
# Layers shorter than this are not judged: Python's share of them, clock and scheduling
# noise dominate there (a decode step's layer is about 1 ms).
MIN_WALL_S = 0.002
# Layers at the user's count are judged together, this much wall time at a time.
WINDOW_S = 0.04
# A window is starved when the process got less than n - SHARE cores' worth of CPU time.
SHARE = 0.3
# Starved windows in a row before threads are taken away.
STARVED_IN_A_ROW = 2
# Layers at the reduced count between probes at the user's count (a 6-layer model probes
# every few forwards; a probe's window costs a layer or two at the starved speed).
PROBE_EVERY = 24


class Governor:
    """The process's thread choice for fastlm's CPU layers (see the module docstring).

    ``wall`` and ``cpu`` are the clocks (injected by tests); ``set_threads`` sets the
    calling thread's intra-op count. Python threads running layers at once share it without
    a lock: a lost update only shifts a probe or a window by a layer."""

    def __init__(self, wall: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.process_time,
                 set_threads: Callable[[int], None] = torch.set_num_threads):  # fmt: skip
        self.wall, self.cpu, self.set_threads = wall, cpu, set_threads
        self.reset()

    def reset(self) -> None:
        self.reduced_by = 0  # threads taken from the user's count (0: the user's count)
        self.starved = 0  # starved windows in a row
        self.since_probe = 0  # layers run at the reduced count since the last probe
        self.probing = False  # a window at the user's count while reduced
        self._window_wall = self._window_cpu = 0.0

    def threads_for(self, n: int) -> int:
        """The thread count of the next layer when the user's count is ``n``."""
        if self.reduced_by == 0 or self.probing:
            return n
        self.since_probe += 1
        if self.since_probe > PROBE_EVERY:
            self.probing = True
            return n
        return max(1, n - self.reduced_by)

    def observe(self, n: int, threads: int, wall_s: float, cpu_s: float) -> None:
        """Add a layer that ran at ``threads`` of the user's ``n`` for ``wall_s`` seconds and
        ``cpu_s`` seconds of process CPU time; judge the window when it is full. Layers at a
        reduced count are not judged (they cannot show whether the cores are free again)."""
        if threads != n or wall_s < MIN_WALL_S:
            return
        self._window_wall += wall_s
        self._window_cpu += cpu_s
        if self._window_wall < WINDOW_S:
            return
        used = self._window_cpu / self._window_wall  # cores' worth of CPU time the process got
        self._window_wall = self._window_cpu = 0.0
        if used >= n - SHARE:
            self.reset()
            return
        self.starved += 1
        if self.reduced_by or self.starved >= STARVED_IN_A_ROW:
            # the cores' worth the window lost, at least one thread
            self.reduced_by = min(n - 1, max(1, round(n - used)))
            self.since_probe = 0
            self.probing = False

    @contextlib.contextmanager
    def scope(self, x: torch.Tensor) -> Iterator[None]:
        """Run the body (one layer over ``x``) at the thread count the rule gives."""
        if MODE not in _MODES:
            raise ValueError(f"FASTLM_CPU_THREADS must be one of {_MODES}, got {MODE!r}")
        if MODE == "off" or x.device.type != "cpu" or torch.compiler.is_compiling():
            yield
            return
        n = torch.get_num_threads()
        if n == 1:
            yield
            return
        threads = self.threads_for(n)
        if threads != n:
            self.set_threads(threads)
        wall, cpu = self.wall(), self.cpu()
        try:
            yield
        finally:
            wall, cpu = self.wall() - wall, self.cpu() - cpu
            if threads != n:
                self.set_threads(n)
            self.observe(n, threads, wall, cpu)


GOVERNOR = Governor()


def governed(forward: Callable) -> Callable:
    """Decorate a layer's ``forward(self, x, ...)`` (``x`` the hidden states, positional or
    as ``hidden_states=``) to run in the process governor's scope of ``x`` on CPU tensors in
    eager mode (a traced forward, and CUDA tensors, call it directly: no context manager
    for torch.compile to trace, none on a GPU's hot path)."""

    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) or x.is_cuda:
            return forward(self, *args, **kwargs)
        with GOVERNOR.scope(x):
            return forward(self, *args, **kwargs)

    return run
