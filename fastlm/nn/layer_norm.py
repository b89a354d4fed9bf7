"""fastlm.nn.LayerNorm: a drop-in for torch.nn.LayerNorm over the last dimension."""

from __future__ import annotations

import torch
from torch import nn

from fastlm.ops.layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """Same parameters, state_dict and constructor as ``torch.nn.LayerNorm`` (normalizing the
    last dimension only), running fastlm's fused kernel. ``forward(x, residual=r)`` returns
    ``(LN(x + r), x + r)`` in one pass, the pre-LN block's residual step.
    """

    backend: str | None = None  # None: automatic choice (fastlm.backends)

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: str | None = None):  # fmt: skip
        super().__init__(
            normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype
        )
        if len(self.normalized_shape) != 1:
            raise NotImplementedError(
                f"fastlm.nn.LayerNorm normalizes the last dimension only; got normalized_shape "
                f"{self.normalized_shape}"
            )
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.LayerNorm, *, backend: str | None = None) -> LayerNorm:
        """A fastlm LayerNorm sharing ``module``'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = module.normalized_shape
        new.eps = module.eps
        new.elementwise_affine = module.elementwise_affine
        new.weight = module.weight
        new.bias = module.bias
        if len(new.normalized_shape) != 1:
            raise NotImplementedError(
                f"fastlm.nn.LayerNorm normalizes the last dimension only; got normalized_shape "
                f"{new.normalized_shape}"
            )
        new.backend = backend
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # Without affine parameters the op has nothing to compare the width with.
        if x.shape[-1:] != self.normalized_shape:
            raise ValueError(
                f"fastlm.nn.LayerNorm: normalized_shape is {tuple(self.normalized_shape)} but the "
                f"input's last dimension is {x.shape[-1:][0] if x.dim() else 'missing (0-d input)'}"
            )
        return layer_norm(
            x, self.weight, self.bias, self.eps, residual=residual, backend=self.backend
        )
