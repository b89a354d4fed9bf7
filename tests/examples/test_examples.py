"""The examples run on CPU with their tiny model and bundled corpus in under 30 s, and
their training loss goes down."""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import time

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


@pytest.mark.parametrize(
    "script", ["pretrain_bert", "finetune_token_classification", "finetune_gpt2"]
)
def test_example_trains(script, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.abspath(EXAMPLES))
    module = importlib.import_module(script)
    # CPU time of one thread, not wall time: the 30 s budget is the example's own work,
    # which a shared CI machine's load does not change (with several threads, OpenMP's
    # spin-waiting on an oversubscribed machine burns CPU time that is not work).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        losses = module.main([])
        elapsed = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" in out
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < 0.85 * first, f"{script}: loss {first:.3f} -> {last:.3f} did not go down"
    assert elapsed < 30, f"{script} took {elapsed:.1f} s of CPU time"
    if script == "finetune_gpt2":
        assert "<|endoftext|>" in out  # generation stops at the eos it learned
    sys.modules.pop(script, None)
