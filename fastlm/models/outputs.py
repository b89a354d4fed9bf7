"""Model outputs with Hugging Face's field names, readable as attributes, keys or indices.

``out.logits``, ``out["logits"]`` and ``out[0]`` (the first field that is not None, as in
transformers' ModelOutput) all work, so code written against transformers keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


class _Output:
    """Attribute, key and positional access over the non-None dataclass fields."""

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def keys(self):
        return self.to_dict().keys()

    def values(self):
        return self.to_dict().values()

    def items(self):
        return self.to_dict().items()

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def __getitem__(self, key: str | int | slice):
        if isinstance(key, str):
            d = self.to_dict()
            if key not in d:
                raise KeyError(
                    f"{type(self).__name__} has no (non-None) field {key!r}; fields: {list(d)}"
                )
            return d[key]
        return tuple(self.to_dict().values())[key]

    def __iter__(self):
        return iter(self.to_dict().values())

    def __len__(self) -> int:
        return len(self.to_dict())

    def to_tuple(self) -> tuple:
        return tuple(self.to_dict().values())


@dataclass
class BaseModelOutput(_Output):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class MaskedLMOutput(_Output):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutput(_Output):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput(_Output):
    """Also transformers' TokenClassifierOutput, MultipleChoiceModelOutput and
    NextSentencePredictorOutput: the same fields."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


TokenClassifierOutput = MultipleChoiceModelOutput = NextSentencePredictorOutput = (
    SequenceClassifierOutput
)


@dataclass
class QuestionAnsweringModelOutput(_Output):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BertForPreTrainingOutput(_Output):
    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
