"""Whether this process's Triton kernels are interpreted (CPU) or compiled (GPU).

kernels/ is installed as ``fastlm.kernels`` and has no ``__init__.py`` on purpose: from the
repository root a regular top-level package named ``kernels`` would hide Hugging Face's
``kernels`` package, which transformers imports while loading any model. A folder without
``__init__.py`` is only a namespace portion, and a regular package anywhere on sys.path wins
over it.

Triton makes each @triton.jit function compiled or interpreted when it is decorated, that
is when its kernel module is imported. Every kernel module imports this one first (through
``_launch`` or ``_autotune``), so the flag below records the mode the kernels were made in,
and TRITON_INTERPRET=1 set too late gets a clear reason instead of Triton's error.
"""

import os

INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
