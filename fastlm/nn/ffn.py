"""fastlm.nn.GeluFFN: the transformer MLP (linear, GELU, linear, optional residual) as one module."""

from __future__ import annotations

import torch
from torch import nn

from fastlm.nn._projection import weight_and_bias
from fastlm.ops.ffn import APPROXIMATIONS, gelu_ffn
from fastlm.ops.linear import widened_operands


class GeluFFN(nn.Module):
    """out = fc2(gelu(fc1(x))) (+ residual) with the bias, GELU and residual add fused into
    the GEMMs (fastlm.gelu_ffn).

    ``fc1``: Linear(hidden, intermediate), ``fc2``: Linear(intermediate, hidden), so the
    state_dict keys are ``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``.
    ``approximate``: "none" (exact GELU: BERT) or "tanh" (gelu_new: GPT-2).
    :meth:`from_linears` wraps existing layers (sharing their parameters): a Hugging Face
    BERT layer's ``intermediate.dense`` and ``output.dense``, or a GPT-2 MLP's ``c_fc`` and
    ``c_proj`` (Conv1D). ``forward(x, residual)`` adds ``residual`` in the second GEMM's
    epilogue (BERT's ``output.dense(h) + input_tensor`` before its LayerNorm). On CPU a
    half-precision GeluFFN given an fp32 ``x`` computes in fp32 on its exactly widened
    weights (a half layer run in fp32: fastlm.ops.linear.widens_layer).
    """

    backend: str | None = None  # None: automatic choice (fastlm.backends)

    def __init__(self, hidden: int, intermediate: int, approximate: str = "none", bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None):  # fmt: skip
        super().__init__()
        self.approximate = _check_approximate(approximate)
        self.fc1 = nn.Linear(hidden, intermediate, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(intermediate, hidden, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_linears(cls, fc1: nn.Module, fc2: nn.Module, approximate: str = "none", *,
                     backend: str | None = None) -> GeluFFN:  # fmt: skip
        """A GeluFFN over existing layers (nn.Linear or transformers Conv1D), sharing their
        parameters (no copy): training either updates both."""
        w1, _ = weight_and_bias(fc1, "GeluFFN", "fc1")
        w2, _ = weight_and_bias(fc2, "GeluFFN", "fc2")
        if w2.shape[1] != w1.shape[0]:
            raise ValueError(
                f"fastlm.nn.GeluFFN: fc2 takes {w2.shape[1]} input features but fc1 gives {w1.shape[0]}"
            )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.approximate = _check_approximate(approximate)
        new.fc1 = fc1
        new.fc2 = fc2
        new.backend = backend
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        w1, b1 = weight_and_bias(self.fc1, "GeluFFN", "fc1")
        w2, b2 = weight_and_bias(self.fc2, "GeluFFN", "fc2")
        # A half-precision FFN given fp32 x (a layer computed in fp32 on CPU): in fp32.
        w1, b1, w2, b2 = widened_operands(x, w1, b1, w2, b2)
        return gelu_ffn(
            x, w1, b1, w2, b2, approximate=self.approximate, residual=residual, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def _check_approximate(approximate: str) -> str:
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(
            f"fastlm.nn.GeluFFN: approximate must be one of {APPROXIMATIONS}, got {approximate!r}"
        )
    return approximate
