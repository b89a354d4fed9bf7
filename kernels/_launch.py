"""Small helpers shared by the launchers."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastlm.kernels import _mode  # noqa: F401  (records the Triton mode before any kernel)

TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs fill the device (a small number under the interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def fp32_dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: true fp32 unless the user enabled TF32 in torch."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
