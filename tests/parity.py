"""Test-side view of the parity rule (fastlm/parity.py) and the dtype matrix."""

from __future__ import annotations

import pytest
import torch

from fastlm.parity import assert_parity, judge, max_err, rounding_step

__all__ = ["KERNEL_DTYPES", "ON_GPU", "assert_parity", "judge", "max_err", "rounding_step"]

ON_GPU = torch.cuda.is_available()
# The Triton interpreter computes bf16 wrongly (ARCHITECTURE.md, Tests): bf16 kernels are tested on a GPU.
KERNEL_DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not ON_GPU, reason="bf16 is wrong under the Triton interpreter; runs on GPU"
        ),
    ),
]
