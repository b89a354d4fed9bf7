"""Triton kernels (installed as ``fastlm.kernels``): @triton.jit functions and thin launchers.

No autograd, no nn.Module and no transformers imports here; validation happens in
``fastlm.ops`` before a launcher is called.
"""
