"""Triton kernels (installed as ``fastlm.kernels``): @triton.jit functions and thin launchers.

No autograd, no nn.Module and no transformers imports here; validation happens in
``fastlm.ops`` before a launcher is called.
"""

import os

# Triton makes each @triton.jit function compiled or interpreted when it is decorated, that
# is when its kernel module is imported. Recorded here (imported before any kernel module)
# so that TRITON_INTERPRET=1 set too late gets a clear reason instead of Triton's error.
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
