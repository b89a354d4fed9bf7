"""The examples run on CPU with their tiny model and bundled corpus in under 30 s, and
their training loss goes down."""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import time

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


@pytest.mark.parametrize(
    "script", ["pretrain_bert", "finetune_token_classification", "finetune_gpt2"]
)
def test_example_trains(script, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.abspath(EXAMPLES))
    module = importlib.import_module(script)
    start = time.perf_counter()
    losses = module.main([])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" in out
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < 0.85 * first, f"{script}: loss {first:.3f} -> {last:.3f} did not go down"
    assert elapsed < 30, f"{script} took {elapsed:.1f} s"
    if script == "finetune_gpt2":
        assert "<|endoftext|>" in out  # generation stops at the eos it learned
    sys.modules.pop(script, None)
