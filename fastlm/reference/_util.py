import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 compute in fp32; fp64 stays fp64 (the test oracle)."""
    return torch.promote_types(dtype, torch.float32)


def up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
