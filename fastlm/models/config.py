"""BERT and GPT-2 configurations read from a Hugging Face config.json (no transformers needed).

Only the fields the fastlm models use are kept; unknown keys are ignored. Values the fastlm
models cannot honour (another activation, relative position embeddings, cross-attention ...)
raise NotImplementedError at construction instead of computing something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

# GELU variants of transformers' ACT2FN that map onto fastlm's approximate= argument.
_GELU_APPROX = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": None,  # a different tanh polynomial: not supported (would be silently off)
}


def gelu_approximate(act: str, model: str) -> str:
    """fastlm's ``approximate=`` for a transformers activation name."""
    approx = _GELU_APPROX.get(act)
    if approx is None:
        raise NotImplementedError(
            f"fastlm.models.{model}: activation {act!r} is not supported; expected one of "
            f"{sorted(k for k, v in _GELU_APPROX.items() if v)}"
        )
    return approx


PROBLEM_TYPES = (
    None,
    "regression",
    "single_label_classification",
    "multi_label_classification",
)


def _positive_int(cfg: Any, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{type(cfg).__name__}: {name} must be a positive int, got {v!r}")


def _probability(cfg: Any, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{type(cfg).__name__}: {name} must be a probability in [0, 1), got {v!r}")


@dataclass
class _ConfigBase:
    """Fields every model shares: the task heads' labels and HF's initialisation and tying."""

    model_type: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}

    num_labels: int = 2
    id2label: dict = field(default_factory=dict)
    problem_type: str | None = None
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    architectures: list | None = None

    def _check_shared(self) -> None:
        if self.id2label:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        _positive_int(self, "num_labels")
        if not self.id2label:
            # transformers' names for unnamed labels; it reads num_labels from id2label, so a
            # config.json without them would reload with a warning and the wrong count.
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"{type(self).__name__}: problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}"
            )
        if self.classifier_dropout is not None:
            _probability(self, "classifier_dropout")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(
                f"{type(self).__name__}: initializer_range must be >= 0, got {self.initializer_range!r}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt is not None and mt != cls.model_type:
            raise ValueError(
                f"{cls.__name__}: config has model_type {mt!r}, expected {cls.model_type!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            k = cls.aliases.get(k, k)
            if k in names:
                kw[k] = v
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides):
        """The config of a ``config.json``, with ``overrides`` (field=value) applied on top.

        ``num_labels`` overrides the file's ``id2label`` (transformers' rule)."""
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{cls.__name__}: {path} is not valid JSON ({exc})") from exc
        if "num_labels" in overrides and "id2label" not in overrides:
            d.pop("id2label", None)
        return cls.from_dict({**d, **overrides})

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} | set(cls.aliases)

    @classmethod
    def from_hf(cls, hf_config: Any):
        """From a transformers config object (uses its to_dict())."""
        return cls.from_dict(hf_config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = {"model_type": self.model_type, **dataclasses.asdict(self)}
        d["label2id"] = {v: k for k, v in self.id2label.items()}
        return d

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)


@dataclass
class BertConfig(_ConfigBase):
    model_type: ClassVar[str] = "bert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False

    def __post_init__(self):
        for n in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size"):  # fmt: skip
            _positive_int(self, n)
        _probability(self, "hidden_dropout_prob")
        _probability(self, "attention_probs_dropout_prob")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig: hidden_size {self.hidden_size} must be a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.position_embedding_type != "absolute":
            raise NotImplementedError(
                f"BertConfig: position_embedding_type {self.position_embedding_type!r} is not supported "
                "(only 'absolute')"
            )
        if self.is_decoder or self.add_cross_attention:
            raise NotImplementedError("BertConfig: decoder / cross-attention BERT is not supported")
        self._check_shared()
        gelu_approximate(self.hidden_act, "BertModel")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class GPT2Config(_ConfigBase):
    model_type: ClassVar[str] = "gpt2"
    aliases: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        for n in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            _positive_int(self, n)
        for n in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            _probability(self, n)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config: n_embd {self.n_embd} must be a multiple of n_head {self.n_head}"
            )
        if self.add_cross_attention:
            raise NotImplementedError("GPT2Config: cross-attention GPT-2 is not supported")
        self._check_shared()
        gelu_approximate(self.activation_function, "GPT2Model")

    # transformers' generic names, so code can read either spelling.
    hidden_size = property(lambda self: self.n_embd)
    num_hidden_layers = property(lambda self: self.n_layer)
    num_attention_heads = property(lambda self: self.n_head)
    max_position_embeddings = property(lambda self: self.n_positions)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def layer_scale(self, layer_idx: int) -> float:
        """Softmax scale of layer ``layer_idx`` (HF's scale_attn_weights / inverse-layer-idx rule)."""
        s = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            s /= float(layer_idx + 1)
        return s
