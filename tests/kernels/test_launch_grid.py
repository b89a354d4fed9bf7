"""The attention launchers keep batch x heads off the capped grid axes.

CUDA caps grid axes 1 and 2 at 65535 programs; axis 0 takes 2^31 - 1. BERT inference at
batch 5462 with 12 heads has 65544 (batch, head) rows: a launcher that puts them on axis 1
fails there with "invalid argument". Running that many programs through the interpreter
would take minutes, so the kernels are replaced by recorders of the grid the launcher
computes; the parity tests prove that the kernels decode the flat grid correctly.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastlm.kernels import attention_bwd, attention_common, attention_fwd

AXIS_CAP = 65535  # grid axes 1 and 2 (CUDA's gridDim.y / gridDim.z)
BATCH, HEADS = 5462, 12  # 65544 (batch, head) rows


class _GridRecorder:
    """Stands in for a (possibly autotuned) Triton kernel: ``kernel[grid](...)`` records the
    grid for the given block sizes instead of launching."""

    def __init__(self, grids: list, block: int):
        self.grids, self.block = grids, block
        self.configs = [None]  # one config: the launch path never prunes or benchmarks

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {"BLOCK_M": self.block, "BLOCK_N": self.block, **kwargs}
            self.grids.append(tuple(grid(meta) if callable(grid) else grid))

        return launch


@pytest.fixture
def grids(monkeypatch) -> list:
    recorded: list = []
    for module, name in [
        (attention_fwd, "_attn_fwd_kernel"),
        (attention_bwd, "_bwd_preprocess_kernel"),
        (attention_bwd, "_bwd_dkdv_kernel"),
        (attention_bwd, "_bwd_dq_kernel"),
        (attention_common, "_dropout_mask_kernel"),
    ]:
        monkeypatch.setattr(module, name, _GridRecorder(recorded, block=16))
    return recorded


def _check(grids: list, launches: int, rows: int) -> None:
    assert len(grids) == launches, grids
    for grid in grids:
        assert all(n <= AXIS_CAP for n in grid[1:]), f"grid {grid} passes the 65535 cap"
        assert math.prod(grid) >= rows, f"grid {grid} has fewer programs than {rows} rows"


def test_forward_and_backward_grids_put_batch_heads_on_axis_0(grids):
    q = torch.zeros(BATCH, 1, HEADS, 16)
    lse = torch.zeros(BATCH, HEADS, 1)
    attention_fwd.attention_fwd(q, q, q, None, None, None, 1, 1, False, 0.25, 0.0, 0)
    _check(grids, 1, BATCH * HEADS)
    grids.clear()
    attention_bwd.attention_bwd(q, q, q, q, q, lse, None, None, None, 1, 1, False, 0.25, 0.0, 0)
    _check(grids, 3, BATCH * HEADS)  # preprocess, dk/dv, dq


def test_dropout_mask_grid_puts_batch_heads_on_axis_0(grids):
    attention_common.dropout_keep_mask(0, BATCH, HEADS, 1, 1, 0.1, torch.device("cpu"))
    _check(grids, 1, BATCH * HEADS)
