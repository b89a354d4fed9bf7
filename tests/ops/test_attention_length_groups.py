"""The torch backend's CPU packed path: sequences grouped by length into padded SDPA calls
(fastlm/ops/attention/_length_groups.py). Whatever the grouping, the result is the exact
packed attention; the grouping itself follows its cost model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastlm.ops.attention import _length_groups
from fastlm.ops.attention._length_groups import length_groups
from tests.ops.test_attention_varlen import CASES, _id, run_case

# CALL_COST 0: a call is free, so only equal lengths share one; huge: one call for all.
CALL_COSTS = [0, _length_groups.CALL_COST, 10**12]


@pytest.mark.parametrize("call_cost", CALL_COSTS, ids=["per-length", "model", "one-call"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_any_grouping_gives_exact_packed_attention(case, call_cost, monkeypatch):
    monkeypatch.setattr(_length_groups, "CALL_COST", call_cost)
    run_case(case, torch.float32, torch.device("cpu"), "torch")


def test_groups_follow_the_cost_model():
    # Equal lengths always share a call; a lone long sequence does not drag short ones
    # into its padding; empty sequences need no call.
    assert length_groups([8, 8, 8], [8, 8, 8]) == [[0, 1, 2]]
    assert length_groups([512, 8, 9], [512, 8, 9]) == [[0], [2, 1]]
    assert length_groups([0, 5, 5], [5, 0, 5]) == [[2]]


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=40))
def test_groups_partition_and_never_cost_more_than_one_call_each(lengths):
    lens_q, lens_k = [a for a, _ in lengths], [b for _, b in lengths]
    groups = length_groups(lens_q, lens_k)
    flat = [b for g in groups for b in g]
    assert sorted(flat) == [b for b in range(len(lengths)) if lens_q[b] and lens_k[b]]

    def cost(g):
        return _length_groups._cost(len(g), max(lens_q[b] for b in g), max(lens_k[b] for b in g))

    apart = sum(_length_groups._cost(1, lens_q[b], lens_k[b]) for b in flat)
    assert sum(cost(g) for g in groups) <= apart
