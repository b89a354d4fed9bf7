"""BERT task models under transformers' names, outputs and losses, all on :class:`TaskModel`.

Every head reads the backbone's unpadded run (``BertModel._run``): the token heads
(MLM, NER, QA) read ``last_hidden_state`` (B, S, H), whose padded positions hold zeros;
the sequence heads (classification, NSP, multiple choice) read the pooled [CLS].
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fastlm.models.bert import BertModel
from fastlm.models.config import BertConfig, gelu_approximate
from fastlm.models.heads import (
    TaskModel,
    classifier_dropout,
    sequence_classification_loss,
    span_loss,
    token_loss,
)
from fastlm.models.outputs import (
    BertForPreTrainingOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from fastlm.nn import LayerNorm, Linear
from fastlm.ops.ffn import linear_gelu

# The MLM decoder shares the word embedding, and HF keeps decoder.bias == predictions.bias.
_MLM_TIES = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
_MLM_BIAS_TIE = {"cls.predictions.decoder.bias": "cls.predictions.bias"}


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.approximate = gelu_approximate(config.hidden_act, "BertForMaskedLM")

    def forward(self, x, backend):
        h = linear_gelu(
            x, self.dense.weight, self.dense.bias, approximate=self.approximate, backend=backend
        )
        return self.LayerNorm(h)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = Linear(config.hidden_size, config.vocab_size)
        self.bias = self.decoder.bias  # HF ties decoder.bias to predictions.bias

    def forward(self, x, backend):
        return self.decoder(self.transform(x, backend))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = Linear(config.hidden_size, 2)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = Linear(config.hidden_size, 2)


class _BertTask(TaskModel):
    config_class = BertConfig
    backbone_cls = BertModel
    base_model_prefix = "bert"
    checkpoint_prefixes = ("bert.",)

    def __init__(self, config: BertConfig, add_pooling_layer: bool | None = None, *,
                 backend: str | None = None):  # fmt: skip
        pool = self.add_pooling_layer if add_pooling_layer is None else add_pooling_layer
        super().__init__(config, backend=backend, add_pooling_layer=pool)

    def pooled(self, out) -> torch.Tensor:
        if out.pooler_output is None:
            raise ValueError(
                f"{type(self).__name__}: this head reads the pooled [CLS]; the model was built "
                "with add_pooling_layer=False"
            )
        return out.pooler_output

    def _zero_mlm_bias(self) -> None:
        with torch.no_grad():
            self.cls.predictions.bias.zero_()


class BertForMaskedLM(_BertTask):
    """MLM: logits (B, S, vocab) over every position; loss on labels != -100."""

    _tied_keys: ClassVar[dict[str, str]] = _MLM_TIES
    _always_tied_keys: ClassVar[dict[str, str]] = _MLM_BIAS_TIE
    add_pooling_layer = False

    def build_head(self, config):
        self.cls = BertOnlyMLMHead(config)

    def post_init(self):
        super().post_init()
        self._zero_mlm_bias()

    def head(self, out, input_ids, labels=None):
        logits = self.cls.predictions(out.last_hidden_state, self.backend)
        return MaskedLMOutput(token_loss(logits.float(), labels, "BertForMaskedLM"), logits)


class BertForNextSentencePrediction(_BertTask):
    """NSP: logits (B, 2), 0 = sentence B follows sentence A, 1 = B is random."""

    def build_head(self, config):
        self.cls = BertOnlyNSPHead(config)

    def head(self, out, input_ids, labels=None):
        logits = self.cls.seq_relationship(self.pooled(out))
        return NextSentencePredictorOutput(
            token_loss(logits, labels, "BertForNextSentencePrediction"), logits
        )


class BertForPreTraining(_BertTask):
    """BERT's pretraining: loss = MLM cross-entropy + NSP cross-entropy (when both labels
    are given, as transformers)."""

    _tied_keys: ClassVar[dict[str, str]] = _MLM_TIES
    _always_tied_keys: ClassVar[dict[str, str]] = _MLM_BIAS_TIE
    head_keywords = ("labels", "next_sentence_label")

    def build_head(self, config):
        self.cls = BertPreTrainingHeads(config)

    def post_init(self):
        super().post_init()
        self._zero_mlm_bias()

    def head(self, out, input_ids, labels=None, next_sentence_label=None):
        where = "BertForPreTraining"
        mlm = self.cls.predictions(out.last_hidden_state, self.backend)
        nsp = self.cls.seq_relationship(self.pooled(out))
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = token_loss(mlm.float(), labels, where) + token_loss(
                nsp, next_sentence_label, where
            )
        return BertForPreTrainingOutput(loss, mlm, nsp)


class BertForSequenceClassification(_BertTask):
    """Pooled [CLS] -> dropout -> classifier (B, num_labels); every problem type."""

    def build_head(self, config):
        self.num_labels = config.num_labels
        self.dropout = classifier_dropout(config, config.hidden_dropout_prob)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    def head(self, out, input_ids, labels=None):
        logits = self.classifier(self.dropout(self.pooled(out)))
        loss = sequence_classification_loss(
            logits, labels, self.config, "BertForSequenceClassification"
        )
        return SequenceClassifierOutput(loss, logits)


class BertForTokenClassification(_BertTask):
    """Per-token dropout -> classifier (B, S, num_labels) (NER)."""

    add_pooling_layer = False

    def build_head(self, config):
        self.num_labels = config.num_labels
        self.dropout = classifier_dropout(config, config.hidden_dropout_prob)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    def head(self, out, input_ids, labels=None):
        logits = self.classifier(self.dropout(out.last_hidden_state))
        return TokenClassifierOutput(
            token_loss(logits, labels, "BertForTokenClassification"), logits
        )


class BertForQuestionAnswering(_BertTask):
    """Span extraction: start and end logits (B, S) from one (H, 2) projection."""

    add_pooling_layer = False
    head_keywords = ("start_positions", "end_positions")

    def build_head(self, config):
        self.num_labels = config.num_labels
        self.qa_outputs = Linear(config.hidden_size, config.num_labels)

    def head(self, out, input_ids, start_positions=None, end_positions=None):
        if self.num_labels != 2:
            raise ValueError(
                f"BertForQuestionAnswering: num_labels must be 2 (start, end), got {self.num_labels}"
            )
        start, end = self.qa_outputs(out.last_hidden_state).unbind(-1)
        loss = span_loss(start, end, start_positions, end_positions, "BertForQuestionAnswering")
        return QuestionAnsweringModelOutput(loss, start, end)


class BertForMultipleChoice(_BertTask):
    """(B, C, S) inputs, one sequence per choice, run as a (B*C, S) batch; logits (B, C)."""

    def build_head(self, config):
        self.dropout = classifier_dropout(config, config.hidden_dropout_prob)
        self.classifier = Linear(config.hidden_size, 1)

    def backbone_inputs(self, input_ids, attention_mask, token_type_ids, position_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 3:
            raise ValueError(
                "BertForMultipleChoice.forward: input_ids must be (batch, num_choices, seq), got "
                f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
            )

        def flat(t):
            return t if t is None else t.reshape(-1, t.shape[-1])

        return flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids)

    def head(self, out, input_ids, labels=None):
        scores = self.classifier(self.dropout(self.pooled(out)))
        logits = scores.view(-1, input_ids.shape[1])
        return MultipleChoiceModelOutput(
            token_loss(logits, labels, "BertForMultipleChoice"), logits
        )
