"""The one pattern every task model follows: backbone -> head -> loss.

A task model (``BertForTokenClassification``, ``GPT2ForSequenceClassification`` ...) is a
:class:`TaskModel`: it names its backbone class and attribute (``bert``, ``transformer``)
and the label keywords its forward takes, builds its head modules under transformers' names
in ``build_head``, and maps the backbone's output to its logits and loss in ``head``. The
forward itself (argument checks, the unpadded backbone run, ``output_hidden_states``,
``return_dict``) is written once, here.

The losses are transformers' ones, in one place.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.models._base import FastLMPreTrained, forward_flags
from fastlm.models.outputs import BaseModelOutput

IGNORE_INDEX = -100


class TaskModel(FastLMPreTrained):
    """A backbone plus a head; subclasses set the class attributes and two methods."""

    backbone_cls: ClassVar[type[FastLMPreTrained]]
    base_model_prefix: ClassVar[str]
    # forward's keywords for the head, in transformers' names (``labels``, ``start_positions``).
    head_keywords: ClassVar[tuple[str, ...]] = ("labels",)
    # Whether the backbone builds its pooler (transformers' default per task class).
    add_pooling_layer: ClassVar[bool] = True

    def __init__(self, config, *, backend: str | None = None, **backbone_kwargs):
        super().__init__(config, backend)
        setattr(self, self.base_model_prefix, self.make_backbone(config, **backbone_kwargs))
        self.build_head(config)
        self.post_init()

    def make_backbone(self, config, **kwargs) -> FastLMPreTrained:
        return self.backbone_cls(config, **kwargs)

    @property
    def base_model(self) -> FastLMPreTrained:
        return getattr(self, self.base_model_prefix)

    def build_head(self, config) -> None:
        raise NotImplementedError

    def head(self, out: BaseModelOutput, input_ids: torch.Tensor, **targets) -> Any:
        """The task output (logits and, when targets are given, the loss) from the backbone's."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        head_args = {k: kwargs.pop(k) for k in self.head_keywords if k in kwargs}
        where = f"{type(self).__name__}.forward"
        hidden, return_dict = forward_flags(
            {k: v for k, v in kwargs.items() if k not in self.backbone_keywords}, where
        )
        ids, attention_mask, token_type_ids, position_ids = self.backbone_inputs(
            input_ids, attention_mask, token_type_ids, position_ids
        )
        out = self.base_model._run(
            ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            backend=self.backend,
            output_hidden_states=hidden,
            where=where,
            **{k: v for k, v in kwargs.items() if k in self.backbone_keywords},
        )
        result = self.head(out, input_ids, **head_args)
        result.hidden_states = out.hidden_states
        return result if return_dict else result.to_tuple()

    def backbone_inputs(self, input_ids, attention_mask, token_type_ids, position_ids):
        """The backbone's (B, S) inputs from forward's (multiple choice flattens its choices)."""
        return input_ids, attention_mask, token_type_ids, position_ids

    # Extra keywords the backbone's _run takes (GPT-2: the KV cache).
    backbone_keywords: ClassVar[tuple[str, ...]] = ()


def classifier_dropout(config, default: float) -> nn.Dropout:
    """transformers' classifier dropout: ``config.classifier_dropout`` when set, else the
    model's default (BERT: hidden_dropout_prob; GPT-2: 0.1)."""
    p = config.classifier_dropout
    return nn.Dropout(default if p is None else p)


def token_loss(logits: torch.Tensor, labels: torch.Tensor | None, where: str):
    """Cross-entropy over the last dimension, ignoring labels of -100 (MLM, NER, NSP, choice)."""
    if labels is None:
        return None
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{where}: labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, where: str):
    """Next-token cross-entropy: logits at t predict labels at t + 1 (upcast as transformers)."""
    if labels is None:
        return None
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{where}: labels must have the shape of input_ids {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    return token_loss(logits[:, :-1].float(), labels[:, 1:], where)


def sequence_classification_loss(logits, labels, config, where: str):
    """transformers' problem types: regression for 1 label, single-label for integer labels,
    else multi-label (or ``config.problem_type`` when set)."""
    if labels is None:
        return None
    num_labels = config.num_labels
    problem_type = config.problem_type
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if labels.shape != logits.shape:
        raise ValueError(
            f"{where}: multi-label labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def span_loss(start_logits, end_logits, start_positions, end_positions, where: str):
    """Question answering: mean of the start and end cross-entropies; positions outside the
    sequence are clamped to ``seq`` and ignored, as transformers does."""
    if start_positions is None or end_positions is None:
        if (start_positions is None) != (end_positions is None):
            raise ValueError(f"{where}: pass both start_positions and end_positions, or neither")
        return None
    seq = start_logits.shape[1]
    start = start_positions.reshape(-1).clamp(0, seq)
    end = end_positions.reshape(-1).clamp(0, seq)
    return (
        F.cross_entropy(start_logits, start, ignore_index=seq)
        + F.cross_entropy(end_logits, end, ignore_index=seq)
    ) / 2
