"""nn.Modules over the fused ops: what fastlm.models and fastlm.optimize build on."""

from fastlm.nn.attention import SelfAttention
from fastlm.nn.attention_layouts import Cached, Packed, Padded
from fastlm.nn.ffn import GeluFFN
from fastlm.nn.layer_norm import LayerNorm
from fastlm.nn.linear import Linear
from fastlm.ops.linear import linear

__all__ = [
    "Cached",
    "GeluFFN",
    "LayerNorm",
    "Linear",
    "Packed",
    "Padded",
    "SelfAttention",
    "linear",
]
