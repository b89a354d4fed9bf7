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

Padded positions (attention_mask == 0) of ``last_hidden_state`` hold zeros. Eager CPU
batches skip them (the packing above); on CUDA and under torch.compile the forward reads
nothing on the host, so it runs the padded batch with a key_padding_mask instead
(:func:`skips_padding` says why), with no host sync and no graph break. transformers
computes padded positions anyway (queries at padding attend to the valid keys); on valid
positions the two agree. The pooler reads position 0 as HF does, so for
left-padded inputs the pooled output differs from HF's (HF pools a padding token).

Dropout: attention-probability dropout runs inside the attention op (dropout_p), hidden
dropout with nn.Dropout, both only in train mode. With hidden dropout active the FFN
residual cannot sit in the GEMM epilogue (dropout comes before the add), so that step
falls back to gelu_ffn + dropout + LN(residual) — same math, one extra pass.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fastlm.cpu_threads import governed
from fastlm.models._base import (
    FastLMPreTrained,
    check_attention_mask,
    check_input_ids,
    check_position_ids,
    check_values,
    drop_full_mask,
    reads_are_free,
)
from fastlm.models._weights import DerivedWeight
from fastlm.models.config import BertConfig, gelu_approximate
from fastlm.models.outputs import BaseModelOutput
from fastlm.nn import GeluFFN, LayerNorm, Linear, linear
from fastlm.nn.attention_layouts import Packed, Padded
from fastlm.ops.linear import widens_layer
from fastlm.ops.padding import pad_input, unpad_input


def _cat(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts, dim=0)


# Packing removes the padded rows from every GEMM, LayerNorm and FFN of the forward for the
# price of a gather and a scatter of the hidden states (once per forward in fastlm's
# BertModel, once per layer under optimize()) and a few grouped attention calls instead of
# one. With little padding that price is not repaid: below this fraction of padded
# positions the padded batch runs as it is (one SDPA call with a key mask), as stock
# transformers does. Measured (benchmarks/results/cpu/workloads.md, MiniLM fp32, 2-core
# CPU): packing gave 0.94-1.07x stock at 10% padding (the padded path gives ~1.1x there),
# 1.06-1.57x at 30%; the line sits between.
PACK_MIN_PADDING = 0.20

# On a GPU, packing costs one host read of the token count per forward (a device sync, as
# FasterTransformer's, ByteTransformer's and transformers' flash-attention paths pay) and
# removes all padded work; the padded path reads nothing. Which wins on a GPU has not been
# measured yet (benchmarks/bench_families.py's packed-vs-padded rows, in gpu_check.sh, do),
# so the default stays padded; FASTLM_PACK_ON_GPU=1 (or setting this attribute) packs eager
# CUDA batches by the same PACK_MIN_PADDING rule. Never under torch.compile or while a CUDA
# graph is being captured (a sync there is an error).
PACK_ON_GPU = os.environ.get("FASTLM_PACK_ON_GPU", "0") == "1"


def skips_padding(mask: torch.Tensor | None) -> bool:
    """Whether the forward packs the valid tokens (:class:`Packed`) rather than running the
    padded batch (:class:`Padded`).

    Packing needs the number of tokens on the host (``nonzero``, the longest sequence): free
    for an eager CPU tensor, a device sync per forward on CUDA and a data-dependent shape
    (graph break) under torch.compile. So only eager CPU batches are packed, and only those
    with at least ``PACK_MIN_PADDING`` of their positions padded; CUDA and compiled forwards
    attend over the padded batch with ``key_padding_mask`` and read nothing on the host
    (unless ``PACK_ON_GPU``). Valid positions agree either way.
    """
    if mask is None:
        return False
    if not reads_are_free(mask) and not _packs_on_device(mask):
        return False
    return int(mask.count_nonzero()) <= (1.0 - PACK_MIN_PADDING) * mask.numel()


def _packs_on_device(mask: torch.Tensor) -> bool:
    return (
        PACK_ON_GPU
        and mask.device.type == "cuda"
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)  # (1 or B, S, H) broadcasts over the batch
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = Linear(h, h)
        self.key = Linear(h, h)
        self.value = Linear(h, h)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        # One GEMM for q, k, v: see fastlm/models/_weights.py for why a version-checked cache.
        self._qkv_weight = DerivedWeight(_cat)
        self._qkv_bias = DerivedWeight(_cat)

    def forward(self, x: torch.Tensor, layout: Packed | Padded, backend) -> torch.Tensor:
        w = self._qkv_weight(self.query.weight, self.key.weight, self.value.weight)
        b = self._qkv_bias(self.query.bias, self.key.bias, self.value.bias)
        t = x.shape[0]
        qkv = linear(x, w, b).view(t, 3, self.num_attention_heads, self.attention_head_size)
        q, k, v = qkv.unbind(1)
        out = layout.attend(
            q, k, v, dropout_p=self.dropout.p if self.training else 0.0, backend=backend
        )
        return out.reshape(t, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.LayerNorm(self.dropout(self.dense(a)), residual=x)
        return y


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, layout, backend):
        return self.output(self.self(x, layout, backend), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        # The fused FFN over HF's two Linear layers (shared parameters). Kept out of the
        # module tree so state_dict keeps HF's names only.
        self.__dict__["ffn"] = GeluFFN.from_linears(
            self.intermediate.dense,
            self.output.dense,
            gelu_approximate(config.hidden_act, "BertModel"),
        )

    @governed
    def forward(self, x: torch.Tensor, layout: Packed | Padded, backend) -> torch.Tensor:
        fc1 = self.intermediate.dense
        if widens_layer(x, fc1.weight, fc1.bias):
            # A half-precision layer whose products run in fp32 on this host: wholly in fp32,
            # its output rounded once (see widens_layer).
            return self._layer(x.float(), layout, backend).to(x.dtype)
        return self._layer(x, layout, backend)

    def _layer(self, x: torch.Tensor, layout: Packed | Padded, backend) -> torch.Tensor:
        x = self.attention(x, layout, backend)
        self.ffn.backend = backend
        out = self.output
        if out.dropout.p > 0 and self.training:
            # Dropout comes before the residual add, so the add cannot sit in the GEMM epilogue.
            y, _ = out.LayerNorm(out.dropout(self.ffn(x)), residual=x)
            return y
        return out.LayerNorm(self.ffn(x, residual=x))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, layout, backend, keep_hidden: bool):
        """The last (tokens, H) hidden states and, when ``keep_hidden``, every layer's (input first)."""
        states = [x] if keep_hidden else None
        for layer in self.layer:
            x = layer(x, layout, backend)
            if keep_hidden:
                states.append(x)
        return x, states


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

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
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        return self.backbone_forward(
            input_ids, kwargs, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids,
        )  # fmt: skip

    def _run(
        self,
        input_ids,
        *,
        attention_mask,
        token_type_ids,
        position_ids,
        backend,
        output_hidden_states: bool,
        where: str,
    ) -> BaseModelOutput:
        cfg = self.config
        check_input_ids(input_ids, cfg.vocab_size, cfg.max_position_embeddings, where)
        bsz, seq = input_ids.shape
        mask = drop_full_mask(check_attention_mask(attention_mask, (bsz, seq), where))
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(seq, device=dev)[None]
        else:
            check_position_ids(position_ids, bsz, seq, cfg.max_position_embeddings, where)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(
                    f"{where}: token_type_ids must have shape {tuple(input_ids.shape)}, "
                    f"got {tuple(token_type_ids.shape)}"
                )
            check_values(
                token_type_ids,
                lambda: (token_type_ids >= 0) & (token_type_ids < cfg.type_vocab_size),
                f"{where}: token_type_ids must lie in [0, {cfg.type_vocab_size}) (type_vocab_size)",
            )
        emb = self.embeddings(input_ids, token_type_ids, position_ids)

        if skips_padding(mask):
            packed, indices, cu, max_len = unpad_input(emb, mask)
            layout = Packed(cu, max_len)

            def pad(x: torch.Tensor) -> torch.Tensor:
                return pad_input(x, indices, bsz, seq)

        else:
            packed, layout = emb.reshape(bsz * seq, -1), Padded(bsz, seq, mask)

            def pad(x: torch.Tensor) -> torch.Tensor:
                x = x.view(bsz, seq, -1)
                # Padded positions hold zeros, as in the packed layout.
                return x if mask is None else x.masked_fill(~mask[..., None], 0.0)

        if isinstance(layout, Packed) and layout.max_seqlen == 0:
            # Every row is padding: nothing to compute; padded positions hold zeros.
            states = [packed] * (len(self.encoder.layer) + 1)
        else:
            packed, states = self.encoder(packed, layout, backend, output_hidden_states)
        hidden = pad(packed)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutput(
            last_hidden_state=hidden,
            pooler_output=pooled,
            hidden_states=tuple(pad(s) for s in states) if output_hidden_states else None,
        )
