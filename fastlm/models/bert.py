"""BERT encoder on fastlm ops, with Hugging Face's module names and state_dict keys.

Fast path of BertModel.forward, hidden size H, n heads of size d:

    emb     = LN(word[ids] + type[tt] + pos[p])                    (B, S, H)
    packed  = unpad_input(emb, attention_mask)                     (T, H), T = valid tokens
    per layer (post-LN):
        q|k|v = packed @ [Wq; Wk; Wv]^T + [bq; bk; bv]             one GEMM, (T, 3, n, d) views
        a     = attention_varlen(q, k, v, cu_seqlens)              (T, n, d), sequences kept apart
        x     = LN(a Wo^T + bo + packed)                           fused residual + LayerNorm
        packed= LN(x + W2 gelu(W1 x + b1) + b2)                    gelu_ffn with residual, then LN
    last_hidden_state = pad_input(packed)                          (B, S, H)

Padded positions (attention_mask == 0) of ``last_hidden_state`` hold zeros: they are never
computed. transformers computes them anyway (queries at padding attend to the valid keys);
on valid positions the two agree. The pooler reads position 0 as HF does, so for
left-padded inputs the pooled output differs from HF's (HF pools a padding token).

Dropout: attention-probability dropout runs inside the attention op (dropout_p), hidden
dropout with nn.Dropout, both only in train mode. With hidden dropout active the FFN
residual cannot sit in the GEMM epilogue (dropout comes before the add), so that step
falls back to gelu_ffn + dropout + LN(residual) — same math, one extra pass.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import fastlm
from fastlm.models._base import (
    FastLMPreTrained,
    check_attention_mask,
    check_input_ids,
    check_position_ids,
)
from fastlm.models._weights import DerivedWeight
from fastlm.models.config import BertConfig, gelu_approximate
from fastlm.models.outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor, backend, residual=None):
    return fastlm.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=residual, backend=backend)


def _cat(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts, dim=0)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids, backend):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)  # (1 or B, S, H) broadcasts over the batch
        return self.dropout(_layer_norm(self.LayerNorm, x, backend))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        # One GEMM for q, k, v: see fastlm/models/_weights.py for why a version-checked cache.
        self._qkv_weight = DerivedWeight(_cat)
        self._qkv_bias = DerivedWeight(_cat)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, backend
    ) -> torch.Tensor:
        w = self._qkv_weight(self.query.weight, self.key.weight, self.value.weight)
        b = self._qkv_bias(self.query.bias, self.key.bias, self.value.bias)
        t = x.shape[0]
        qkv = F.linear(x, w, b).view(t, 3, self.num_attention_heads, self.attention_head_size)
        q, k, v = qkv.unbind(1)
        out = fastlm.attention_varlen(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            causal=False, dropout_p=self.dropout.p if self.training else 0.0, backend=backend,
        )  # fmt: skip
        return out.reshape(t, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, a: torch.Tensor, x: torch.Tensor, backend) -> torch.Tensor:
        y, _ = _layer_norm(self.LayerNorm, self.dropout(self.dense(a)), backend, residual=x)
        return y


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, cu_seqlens, max_seqlen, backend):
        return self.output(self.self(x, cu_seqlens, max_seqlen, backend), x, backend)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.approximate = gelu_approximate(config.hidden_act, "BertModel")

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, backend
    ) -> torch.Tensor:
        x = self.attention(x, cu_seqlens, max_seqlen, backend)
        fc1, fc2, out = self.intermediate.dense, self.output.dense, self.output
        if out.dropout.p > 0 and self.training:
            h = fastlm.gelu_ffn(
                x,
                fc1.weight,
                fc1.bias,
                fc2.weight,
                fc2.bias,
                approximate=self.approximate,
                backend=backend,
            )
            y, _ = _layer_norm(out.LayerNorm, out.dropout(h), backend, residual=x)
            return y
        z = fastlm.gelu_ffn(
            x,
            fc1.weight,
            fc1.bias,
            fc2.weight,
            fc2.bias,
            approximate=self.approximate,
            residual=x,
            backend=backend,
        )
        return _layer_norm(out.LayerNorm, z, backend)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, cu_seqlens, max_seqlen, backend):
        for layer in self.layer:
            x = layer(x, cu_seqlens, max_seqlen, backend)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(FastLMPreTrained):
    """Drop-in for transformers' BertModel (encoder only; absolute positions)."""

    config_class = BertConfig
    checkpoint_prefixes = ("bert.",)

    def __init__(
        self, config: BertConfig, add_pooling_layer: bool = True, *, backend: str | None = None
    ):
        super().__init__(config, backend)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        _init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **unused,
    ) -> BaseModelOutput:
        return self._run(
            input_ids, attention_mask, token_type_ids, position_ids, self.backend, unused
        )

    def _run(
        self, input_ids, attention_mask, token_type_ids, position_ids, backend, unused
    ) -> BaseModelOutput:
        where = f"{type(self).__name__}.forward"
        _reject_unused(unused, where)
        cfg = self.config
        check_input_ids(input_ids, cfg.vocab_size, cfg.max_position_embeddings, where)
        bsz, seq = input_ids.shape
        mask = check_attention_mask(attention_mask, (bsz, seq), where)
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(seq, device=dev)[None]
        else:
            check_position_ids(position_ids, bsz, seq, cfg.max_position_embeddings, where)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif (
            token_type_ids.shape != input_ids.shape
            or int(token_type_ids.max()) >= cfg.type_vocab_size
            or int(token_type_ids.min()) < 0
        ):
            raise ValueError(
                f"{where}: token_type_ids must be {tuple(input_ids.shape)} with values in [0, {cfg.type_vocab_size}), "
                f"got shape {tuple(token_type_ids.shape)}"
            )
        emb = self.embeddings(input_ids, token_type_ids, position_ids, backend)

        if mask is None or bool(mask.all()):
            # No padding: every sequence is full, pack by reshaping (no copy).
            packed, indices = emb.reshape(bsz * seq, -1), None
            cu = torch.arange(0, (bsz + 1) * seq, seq, device=dev, dtype=torch.int32)
            max_len = seq
        else:
            packed, indices, cu, max_len = fastlm.unpad_input(emb, mask)
            max_len = int(max_len)
        packed = self.encoder(packed, cu, max_len, backend)
        hidden = (
            packed.view(bsz, seq, -1)
            if indices is None
            else fastlm.pad_input(packed, indices, bsz, seq)
        )
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutput(last_hidden_state=hidden, pooler_output=pooled)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.approximate = gelu_approximate(config.hidden_act, "BertForMaskedLM")

    def forward(self, x, backend):
        h = fastlm.linear_gelu(
            x, self.dense.weight, self.dense.bias, approximate=self.approximate, backend=backend
        )
        return _layer_norm(self.LayerNorm, h, backend)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = self.decoder.bias  # HF ties decoder.bias to predictions.bias

    def forward(self, x, backend):
        return self.decoder(self.transform(x, backend))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(FastLMPreTrained):
    """Drop-in for transformers' BertForMaskedLM; the decoder weight is the word embedding."""

    config_class = BertConfig
    _tied_keys: ClassVar[dict[str, str]] = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
        "cls.predictions.bias": "cls.predictions.decoder.bias",
    }

    def __init__(self, config: BertConfig, *, backend: str | None = None):
        super().__init__(config, backend)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        _init_weights(self.cls, config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        nn.init.zeros_(self.cls.predictions.bias)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        **unused,
    ):
        out = self.bert._run(
            input_ids, attention_mask, token_type_ids, position_ids, self.backend, unused
        )
        logits = self.cls.predictions(out.last_hidden_state, self.backend)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.shape[-1]).float(), labels.view(-1), ignore_index=-100
            )
        return MaskedLMOutput(loss=loss, logits=logits)


class BertForSequenceClassification(FastLMPreTrained):
    """Drop-in for transformers' BertForSequenceClassification (pooled [CLS] -> classifier)."""

    config_class = BertConfig

    def __init__(self, config: BertConfig, *, backend: str | None = None):
        super().__init__(config, backend)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = (
            config.classifier_dropout
            if config.classifier_dropout is not None
            else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier, config)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        **unused,
    ):
        out = self.bert._run(
            input_ids, attention_mask, token_type_ids, position_ids, self.backend, unused
        )
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = (
            None
            if labels is None
            else _classification_loss(logits, labels, self.num_labels, self.config.problem_type)
        )
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _classification_loss(logits, labels, num_labels, problem_type):
    """transformers' rule: regression for 1 label, single-label for integer labels, else multi-label."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return (
            F.mse_loss(logits.squeeze(), labels.squeeze())
            if num_labels == 1
            else F.mse_loss(logits, labels)
        )
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(f"BertForSequenceClassification: unknown problem_type {problem_type!r}")


def _reject_unused(unused: dict, where: str) -> None:
    """Accept HF keyword arguments that do not change the result; refuse the rest loudly."""
    harmless = {"return_dict", "output_attentions", "output_hidden_states", "use_cache"}
    bad = [k for k, v in unused.items() if k not in harmless and v is not None and v is not False]
    if bad:
        raise NotImplementedError(
            f"{where}: argument(s) {sorted(bad)} are not supported by the fastlm model"
        )


@torch.no_grad()
def _init_weights(module: nn.Module, config: BertConfig) -> None:
    """HF BERT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    std = 0.02
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
