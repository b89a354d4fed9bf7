"""fastlm.nn.Linear: a drop-in for torch.nn.Linear computed by fastlm.ops.linear."""

from __future__ import annotations

import torch
from torch import nn

from fastlm.ops.linear import linear


class Linear(nn.Linear):
    """Same parameters, state_dict and constructor as ``torch.nn.Linear``; each CPU product
    runs in the form this host computes fastest (fastlm.ops.linear: half precision in fp32
    math where the native half GEMM is slower, few rows streamed over the weight where that
    is faster; on CPU an fp32 input with a half-precision weight computes in fp32 on the
    exactly widened weight). On other devices and under torch.compile it is ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
