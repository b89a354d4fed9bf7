"""What every fastlm model shares: loading (from_pretrained, from_hf) and the backend knob."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import nn

from fastlm.models import loading


class FastLMPreTrained(nn.Module):
    """Base of the fastlm BERT/GPT-2 models.

    ``backend`` (None = automatic, "torch", "triton", "cuda") is passed to every fastlm op
    the model calls; set it on the outermost model.
    """

    config_class: ClassVar[type]
    # Checkpoint prefixes that may be present or absent ("bert.", "transformer.").
    checkpoint_prefixes: ClassVar[tuple[str, ...]] = ()
    # state_dict key -> key it is tied to (filled from the source when a checkpoint omits it).
    _tied_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Any, backend: str | None = None):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__}: config must be a {self.config_class.__name__}, "
                f"got {type(config).__name__} (use {self.config_class.__name__}.from_hf for a transformers config)"
            )
        self.config = config
        self.backend = backend

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        backend: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        """Load ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``) from a local directory."""
        cfg_path, w_path = loading.resolve_dir(path, cls.__name__)
        config = cls.config_class.from_json_file(cfg_path)
        model = cls(config, backend=backend)
        loading.load_into(
            model,
            loading.read_state_dict(w_path),
            cls.checkpoint_prefixes,
            f"{cls.__name__}.from_pretrained({os.fspath(path)!r})",
        )
        model.eval()
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, backend: str | None = None):
        """A fastlm copy of a transformers model of the matching architecture (weights copied)."""
        config = cls.config_class.from_hf(hf_model.config)
        model = cls(config, backend=backend)
        p = next(hf_model.parameters())
        model.to(device=p.device, dtype=p.dtype)
        loading.load_into(
            model, hf_model.state_dict(), cls.checkpoint_prefixes, f"{cls.__name__}.from_hf"
        )
        model.train(hf_model.training)
        return model


def check_input_ids(
    input_ids: Any, vocab_size: int, max_positions: int, where: str, past: int = 0
) -> None:
    """Token ids must be an integer (B, S) tensor inside the vocabulary and position table."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"{where}: input_ids must be a torch.Tensor, got {type(input_ids).__name__}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"{where}: input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"{where}: input_ids must be (batch, seq) with seq >= 1, got shape {tuple(input_ids.shape)}"
        )
    if past + input_ids.shape[1] > max_positions:
        raise ValueError(
            f"{where}: sequence length {past + input_ids.shape[1]} exceeds the model's "
            f"max_position_embeddings {max_positions}"
        )
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"{where}: token ids must lie in [0, {vocab_size}) (vocab_size), got values in [{lo}, {hi}]"
            )


def check_attention_mask(mask: Any, shape: tuple[int, ...], where: str) -> torch.Tensor | None:
    """HF-style (B, S) mask of 0/1 (any int/bool/float dtype) -> bool, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{where}: attention_mask must be a torch.Tensor or None, got {type(mask).__name__}"
        )
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{where}: attention_mask must have shape {tuple(shape)}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{where}: attention_mask must hold only 0 and 1 (1 = attend)")
        mask = mask != 0
    return mask


def check_position_ids(
    position_ids: Any, bsz: int, seq: int, max_positions: int, where: str
) -> None:
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise TypeError(
            f"{where}: position_ids must be an integer torch.Tensor, got {position_ids!r:.60}"
        )
    if (
        position_ids.dim() != 2
        or position_ids.shape[1] != seq
        or position_ids.shape[0] not in (1, bsz)
    ):
        raise ValueError(
            f"{where}: position_ids must be (1 or {bsz}, {seq}), got {tuple(position_ids.shape)}"
        )
    lo, hi = int(position_ids.min()), int(position_ids.max())
    if lo < 0 or hi >= max_positions:
        raise ValueError(
            f"{where}: position ids must lie in [0, {max_positions}) (max_position_embeddings), got [{lo}, {hi}]"
        )
