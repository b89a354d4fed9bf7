"""Public functional ops: validation, autograd, torch.library custom op registration.

One module per op; ``fastlm`` re-exports the public functions lazily.
"""
