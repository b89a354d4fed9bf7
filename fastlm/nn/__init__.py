"""nn.Modules over the fused ops."""

from fastlm.nn.ffn import GeluFFN
from fastlm.nn.layer_norm import LayerNorm

__all__ = ["GeluFFN", "LayerNorm"]
