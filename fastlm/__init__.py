"""fastlm: fused Triton and CUDA kernels for BERT- and GPT-style transformers."""

from fastlm.backends import BackendUnavailableError, available_backends, set_backend
from fastlm.ops import layer_norm

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "__version__",
    "available_backends",
    "layer_norm",
    "set_backend",
]
