"""Packed attention on a CPU as a few padded batches: sequences grouped by length.

The torch backend runs a packed (varlen) call on the CPU as SDPA calls over padded
batches. One call per sequence computes no padding but pays a fixed cost per call: the
dispatch, and a parallel region that must gather every thread (a region waits for its
slowest thread, so on cores shared with another process many small regions stall,
milliseconds each). One call over the whole batch padded to the longest sequence pays the
padding's FLOPs. Between the two: sort the sequences by length and cut the sorted run into
groups, each one padded batch, where padding costs less than another call would.

Cost model, in multiply-adds of q k^T and p v per head dim and head (a call's work is
proportional to its padded batch):

    cost(group) = CALL_COST + n * max_q * max_k

A sequence joins the group of the next-longer ones when the merged group costs no more
than the two apart. CALL_COST is the fixed cost of an SDPA call expressed in those units:
about a 64 x 64 attention per head-dim-and-head on the 2-core CPUs fastlm is measured on
(benchmarks/bench_workloads.py); it only moves where groups split, never the result.
"""

from __future__ import annotations

CALL_COST = 64 * 64


def _cost(n: int, max_q: int, max_k: int) -> int:
    return CALL_COST + n * max_q * max_k


def length_groups(lens_q: list[int], lens_k: list[int]) -> list[list[int]]:
    """Sequence indices in groups (each sorted by decreasing key length); every sequence in
    exactly one group. Empty sequences (no query or no key) are left out: they need no call."""
    order = sorted(
        (b for b in range(len(lens_q)) if lens_q[b] and lens_k[b]),
        key=lambda b: (lens_k[b], lens_q[b]),
        reverse=True,
    )
    groups: list[list[int]] = []
    max_q: list[int] = []  # each group's longest query length
    for b in order:
        if groups:
            group, longest_q = groups[-1], max_q[-1]
            longest_k = lens_k[group[0]]  # sorted: the group's first has the longest keys
            merged = _cost(len(group) + 1, max(longest_q, lens_q[b]), longest_k)
            apart = _cost(len(group), longest_q, longest_k) + _cost(1, lens_q[b], lens_k[b])
            if merged <= apart:
                group.append(b)
                max_q[-1] = max(longest_q, lens_q[b])
                continue
        groups.append([b])
        max_q.append(lens_q[b])
    return groups
