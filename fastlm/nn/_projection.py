"""The (weight, bias) of a projection layer, in the (out_features, in_features) layout of
``F.linear``, whether it is a ``torch.nn.Linear`` or a transformers ``Conv1D`` (GPT-2)."""

from __future__ import annotations

import torch
from torch import nn


def weight_and_bias(
    module: nn.Module, owner: str, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as (out, in), bias) of ``module``. A Conv1D stores its weight (in, out): its
    transpose is a strided view that F.linear and the fused kernels read in place (no copy);
    fastlm's GPT-2 Conv1D hands its row-major copy instead while generate holds one.
    ``owner`` and ``name`` only make the error message."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    # A transformers Conv1D, fastlm's GPT-2 Conv1D, or optimize()'s FastLMConv1D subclass.
    if hasattr(module, "nf") and any(c.__name__ == "Conv1D" for c in type(module).__mro__):
        # fastlm's own Conv1D may hold a row-major copy for CPU decoding (linear_weight).
        oriented = getattr(module, "linear_weight", None)
        return (module.weight.t() if oriented is None else oriented()), module.bias
    raise TypeError(
        f"fastlm.nn.{owner}: {name} must be a torch.nn.Linear or a transformers Conv1D, got {type(module).__name__}"
    )
