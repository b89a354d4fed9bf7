"""Public functional ops: validation, autograd, torch.library custom op registration."""

from fastlm.ops.layer_norm import layer_norm

__all__ = ["layer_norm"]
