"""The plain projections of a transformers model under fastlm.optimize: each product through
fastlm.ops.linear, in the form this host computes fastest (see its docstring).

* ``torch.nn.Linear`` becomes ``fastlm.nn.Linear`` (fastlm's drop-in, no transformers);
* transformers' ``Conv1D`` (GPT-2's attention and MLP projections; a weight stored
  (in, out)) becomes :class:`FastLMConv1D`: ``x W + b`` computed as ``F.linear(x, W^T, b)``,
  W^T a strided view read in place, the same GEMM ``torch.addmm(b, x, W)`` asks for.

Both are subclasses with the same parameters and state_dict; only ``forward`` differs.
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from fastlm.ops.linear import linear


class FastLMConv1D(Conv1D):
    """transformers' Conv1D computed by fastlm.ops.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight.t(), self.bias)
