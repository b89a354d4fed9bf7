"""What every fastlm model shares: the Hugging Face model surface (from_pretrained,
save_pretrained, from_hf, .device, .dtype, generation_config), HF's initialisation, the
backend knob and the checks on forward arguments."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from fastlm.models import loading
from fastlm.models.generation_config import GenerationConfig
from fastlm.nn import GeluFFN, LayerNorm


class FastLMPreTrained(nn.Module):
    """Base of the fastlm BERT/GPT-2 models.

    ``backend`` (None = automatic, "torch", "triton", "cuda") is passed to every fastlm op
    the model calls; set it on the outermost model.
    """

    config_class: ClassVar[type]
    # The backbone's attribute name in a task model ("bert", "transformer"); "" for a backbone.
    base_model_prefix: ClassVar[str] = ""
    # Checkpoint prefixes that may be present or absent ("bert.", "transformer.").
    checkpoint_prefixes: ClassVar[tuple[str, ...]] = ()
    # Tied state_dict key -> the key it shares a tensor with, when the config ties embeddings.
    _tied_keys: ClassVar[dict[str, str]] = {}
    # Keys tied whatever the config says (BERT's decoder.bias is predictions.bias).
    _always_tied_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Any, backend: str | None = None):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__}: config must be a {self.config_class.__name__}, "
                f"got {type(config).__name__} (use {self.config_class.__name__}.from_hf for a transformers config)"
            )
        self.config = config
        self.backend = backend
        self.generation_config = GenerationConfig.from_model_config(config)

    @property
    def backend(self) -> str | None:
        return self.__dict__.get("_backend")

    @backend.setter
    def backend(self, value: str | None) -> None:
        """Setting the backend sets it on every fastlm module inside (LayerNorm, GeluFFN)."""
        self.__dict__["_backend"] = value
        for m in self.modules():
            if isinstance(m, FastLMPreTrained):
                m.__dict__["_backend"] = value
            elif isinstance(m, (LayerNorm, GeluFFN)):
                m.backend = value

    # -- the transformers model surface -------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def tied_weights(self) -> dict[str, str]:
        """{tied key: source key} of the weights this model shares (none when untied)."""
        word = self._tied_keys if self.config.tie_word_embeddings else {}
        return {**word, **self._always_tied_keys}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        backend: str | None = None,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ):
        """Load a local checkpoint directory (see :mod:`fastlm.models.loading` for the layouts).

        ``kwargs`` are config overrides (``num_labels=3``, ``hidden_dropout_prob=0.0``) or
        constructor arguments (``add_pooling_layer=False``), as in transformers. Weights the
        checkpoint lacks (a new classifier) are initialised as transformers does, with one
        warning listing them.
        """
        where = f"{cls.__name__}.from_pretrained({os.fspath(path)!r})"
        init_args = set(inspect.signature(cls.__init__).parameters) - {"self", "config", "backend"}
        fields = cls.config_class.field_names()
        unknown = sorted(set(kwargs) - init_args - fields)
        if unknown:
            raise TypeError(
                f"{where}: unknown argument(s) {unknown}; expected config fields of "
                f"{cls.config_class.__name__} or {sorted(init_args)}"
            )
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"{where}: dtype={dtype} and torch_dtype={torch_dtype} disagree")
        cfg_path, w_path = loading.resolve_dir(path, cls.__name__)
        config = cls.config_class.from_json_file(
            cfg_path, **{k: v for k, v in kwargs.items() if k in fields}
        )
        model = cls(config, backend=backend, **{k: v for k, v in kwargs.items() if k in init_args})
        loading.load_into(model, loading.read_state_dict(w_path), cls.checkpoint_prefixes, where)
        gen_path = os.path.join(os.fspath(path), loading.GENERATION_CONFIG_NAME)
        if os.path.isfile(gen_path):
            model.generation_config = GenerationConfig.from_json_file(gen_path)
        model.eval()
        return model.to(device=device, dtype=dtype if dtype is not None else torch_dtype)

    def save_pretrained(self, path: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write ``config.json`` (+ ``generation_config.json``) and ``model.safetensors`` (or
        ``pytorch_model.bin``): a directory transformers and fastlm both load. Tied weights
        are stored once, under their source key, as transformers stores them."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        tied = self.tied_weights()
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in tied}
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(sd, os.path.join(path, loading.SAFE_WEIGHTS), metadata={"format": "pt"})
        else:
            torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        self.config.architectures = [type(self).__name__]
        self.config.to_json_file(os.path.join(path, loading.CONFIG_NAME))
        self.generation_config.to_json_file(os.path.join(path, loading.GENERATION_CONFIG_NAME))

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, backend: str | None = None):
        """A fastlm copy of a transformers model of the matching architecture (weights copied)."""
        config = cls.config_class.from_hf(hf_model.config)
        kwargs = {}
        if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
            base = getattr(hf_model, "bert", hf_model)
            kwargs["add_pooling_layer"] = getattr(base, "pooler", None) is not None
        model = cls(config, backend=backend, **kwargs)
        p = next(hf_model.parameters())
        model.to(device=p.device, dtype=p.dtype)
        loading.load_into(
            model, hf_model.state_dict(), cls.checkpoint_prefixes, f"{cls.__name__}.from_hf"
        )
        hf_generation = getattr(hf_model, "generation_config", None)
        if hf_generation is not None:
            model.generation_config = GenerationConfig.from_dict(
                hf_generation.to_diff_dict(), where=f"{cls.__name__}.from_hf"
            )
        model.train(hf_model.training)
        return model

    def backbone_forward(self, input_ids: torch.Tensor, flags: dict, **inputs):
        """A backbone's forward: transformers' output flags (``output_hidden_states``,
        ``return_dict``; anything else raises) from ``flags``, then ``_run`` on ``inputs``;
        a BaseModelOutput, or its tuple when ``return_dict=False``."""
        where = f"{type(self).__name__}.forward"
        hidden, return_dict = forward_flags(flags, where)
        out = self._run(
            input_ids, backend=self.backend, output_hidden_states=hidden, where=where, **inputs
        )
        return out if return_dict else out.to_tuple()

    def post_init(self) -> None:
        """HF's initialisation of every weight, then the ties (call at the end of __init__)."""
        init_weights(self, self.config)
        self.backend = self.backend  # reach the modules built since __init__
        for dst, src in self.tied_weights().items():
            _set_param(self, dst, _get_param(self, src))


def _get_param(module: nn.Module, key: str) -> nn.Parameter:
    owner, _, name = key.rpartition(".")
    return getattr(module.get_submodule(owner), name)


def _set_param(module: nn.Module, key: str, p: nn.Parameter) -> None:
    owner, _, name = key.rpartition(".")
    setattr(module.get_submodule(owner), name, p)


@torch.no_grad()
def init_weights(module: nn.Module, config: Any) -> None:
    """transformers' BERT/GPT-2 ``_init_weights``: N(0, initializer_range) weights and
    embeddings (padding row zero), zero biases, unit LayerNorm; GPT-2's residual projections
    ``c_proj`` get std / sqrt(2 n_layer) (the GPT-2 paper's scaled init)."""
    std = config.initializer_range
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            scale = (2 * config.n_layer) ** -0.5 if name.endswith("c_proj") else 1.0
            m.weight.normal_(0.0, std * scale)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


# HF forward keywords every fastlm model takes; the values fastlm cannot honour are refused.
_FLAG_DEFAULTS = {
    "return_dict": None,
    "output_attentions": None,
    "output_hidden_states": None,
    "use_cache": None,
}


def forward_flags(extra: dict, where: str) -> tuple[bool, bool]:
    """(output_hidden_states, return_dict) from a forward's extra keywords.

    A keyword passed as None changes nothing and is accepted; ``output_attentions=True`` and any keyword transformers has but fastlm does not
    (``inputs_embeds``, ``head_mask`` ...) raise: nothing is silently ignored.
    """
    bad = sorted(k for k, v in extra.items() if k not in _FLAG_DEFAULTS and v is not None)
    if bad:
        raise NotImplementedError(
            f"{where}: argument(s) {bad} are not supported by the fastlm model"
        )
    if extra.get("output_attentions"):
        raise NotImplementedError(
            f"{where}: output_attentions=True is not supported: the fused attention never "
            "materialises the attention probabilities"
        )
    return bool(extra.get("output_hidden_states")), extra.get("return_dict") is not False


def reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs nothing: an eager CPU tensor.

    Elsewhere a read is a device sync (CUDA) or a graph break (torch.compile), so the model
    paths take their sync-free branch instead.
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_values(
    t: torch.Tensor,
    ok: Callable[[], torch.Tensor],
    message: str,
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``error(message)`` unless ``ok()`` (a bool tensor) holds everywhere, without a sync.

    Eager CPU tensors: checked now (the read is free). CUDA tensors and torch.compile: the
    check runs on the device (``torch._assert_async``), so a bad value fails with a
    device-side assert (a RuntimeError) at the next synchronizing call instead.
    """
    if reads_are_free(t):
        if not bool(ok().all()):
            raise error(message)
    else:
        torch._assert_async(ok().all(), message)


def drop_full_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a bool mask with nothing padded when finding that out is free (eager CPU),
    so the attention takes its unmasked path; otherwise the mask as given (no host read)."""
    if mask is not None and reads_are_free(mask) and bool(mask.all()):
        return None
    return mask


def check_input_ids(
    input_ids: Any, vocab_size: int, max_positions: int, where: str, past: int = 0
) -> None:
    """Token ids must be an integer (B, S) tensor inside the vocabulary and position table.

    Type, dtype and shape are checked on the host (free); the values in [0, vocab_size)
    with :func:`check_values`: a ValueError on eager CPU tensors, a device-side assert on
    CUDA and under torch.compile (no host sync, no graph break).
    """
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
    check_values(
        input_ids,
        lambda: (input_ids >= 0) & (input_ids < vocab_size),
        f"{where}: token ids must lie in [0, {vocab_size}) (vocab_size)",
    )


def check_attention_mask(mask: Any, shape: tuple[int, ...], where: str) -> torch.Tensor | None:
    """HF-style (B, S) mask of 0/1 (any int/bool/float dtype) -> bool, or None.
    The 0/1 values are checked with :func:`check_values` (no host sync off CPU)."""
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
        check_values(
            mask,
            lambda: (mask == 0) | (mask == 1),
            f"{where}: attention_mask must hold only 0 and 1 (1 = attend)",
        )
        mask = mask != 0
    return mask


def check_position_ids(
    position_ids: Any, bsz: int, seq: int, max_positions: int, where: str
) -> None:
    """(1 or B, S) integer position ids in [0, max_positions), checked as the input ids."""
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
    check_values(
        position_ids,
        lambda: (position_ids >= 0) & (position_ids < max_positions),
        f"{where}: position ids must lie in [0, {max_positions}) (max_position_embeddings)",
    )
