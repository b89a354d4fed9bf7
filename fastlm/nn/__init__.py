"""nn.Modules over the fused ops."""

from fastlm.nn.layer_norm import LayerNorm

__all__ = ["LayerNorm"]
