"""The classes fastlm.optimize gives transformers layers: one fused computation per layout,
one forward per way transformers calls a layer.

A fused class is ``FastLM<LayerClass>(<call mixin>, <LayerClass>)``: the transformers layer
class with a forward that runs fastlm's modules (kept in the layer's ``_fastlm_parts``, not
registered, so state_dict keys do not change). The classes are built from the declarations
in families.py the first time they are needed, and live in this module's namespace under
their ``__qualname__``, so an optimized model pickles; unpickling builds the class again
through the module ``__getattr__`` below.

Post-norm encoder (all "bert", "mask" and "mpnet" calls), per layer::

    a = LN1(x + dropout(attention(x)))          # SelfAttention over q/k/v and out, fused add
    y = LN2(a + dropout(fc2(gelu(fc1(a)))))     # GeluFFN: bias+GELU and the add in the GEMMs

On eager CPU, given a padded batch with enough padding to pay for it (the cost rule of
fastlm.models.bert.skips_padding), the layer packs the valid tokens (``unpad_input``), runs
every GEMM, LayerNorm and attention (``attention_varlen``) on those T rows only, and
scatters them back (``pad_input``); padded positions of its output hold zeros (transformers
computes values there: queries at padding). Two kinds of heads read them (question
answering's start/end softmax spans every position; a decoder's sequence classifier pools
the last token that is not the pad id, padded when another id padded the batch), so a
backbone under such a head keeps the padded layout and matches transformers' outputs
(optimize.py sets ``Parts.skip_padding``). The pre-norm decoders pack only their MLP
(row-wise), on the same rule. On CUDA and under torch.compile, reading
the mask to pack would be a sync or a graph break: the layer attends over the padded batch
with the key padding mask instead.

Per call, a layer hands its self-attention to transformers' own attention module when
fastlm.nn.SelfAttention cannot serve the call (see :func:`unfused_self_attention_reason`),
logged once per reason; the FFN stays fused ("bert" calls) or the whole layer runs
transformers' forward over fastlm's LayerNorms ("mask" calls, which have no cross-attention
to keep fused).
"""

from __future__ import annotations

import importlib
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import nn

from fastlm.cpu_threads import governed
from fastlm.integrations.hf.attention import attentions_requested
from fastlm.integrations.hf.families import FAMILIES, EncoderLayout, Family
from fastlm.integrations.hf.log import log_once
from fastlm.models._base import reads_are_free
from fastlm.models.bert import skips_padding
from fastlm.nn import GeluFFN, SelfAttention
from fastlm.nn._projection import weight_and_bias
from fastlm.ops.linear import widens_layer
from fastlm.ops.padding import pad_input, unpad_input

PARTS = "_fastlm_parts"


class Parts(NamedTuple):
    """The fastlm modules a layer runs over its own children, and the children it calls
    between them (resolved once at optimize time, not looked up per call)."""

    attention: SelfAttention | None
    ffn: GeluFFN
    out_dropout: nn.Module | None = None
    attention_norm: nn.Module | None = None
    ffn_dropout: nn.Module | None = None
    ffn_norm: nn.Module | None = None
    # False under a head whose loss reads the padded positions (see optimize.py)
    skip_padding: bool = True


def encoder_parts(layer: nn.Module, layout: EncoderLayout, approximate: str) -> Parts:
    attention = None
    if layout.attention is not None:
        sa = layout.get(layer, layout.attention)
        attention = SelfAttention.from_linears(
            tuple(getattr(sa, name) for name in (layout.query, layout.key, layout.value)),
            layout.get(layer, layout.out), getattr(sa, layout.heads),
            causal=bool(getattr(sa, layout.causal, False)),
            dropout=getattr(sa, layout.probs_dropout).p, softmax_scale=getattr(sa, layout.scaling),
        )  # fmt: skip
        attention.train(layer.training)
    ffn = GeluFFN.from_linears(
        layout.get(layer, layout.fc1), layout.get(layer, layout.fc2), approximate
    )
    return Parts(
        attention, ffn, layout.get(layer, layout.out_dropout),
        layout.get(layer, layout.attention_norm), layout.get(layer, layout.ffn_dropout),
        layout.get(layer, layout.ffn_norm),
    )  # fmt: skip


def decoder_parts(mlp: nn.Module, approximate: str) -> Parts:
    """A pre-norm decoder's MLP (``c_fc``, ``c_proj``: nn.Linear or Conv1D) as a GeluFFN."""
    return Parts(None, GeluFFN.from_linears(mlp.c_fc, mlp.c_proj, approximate))


def gpt2_parts(block: nn.Module, approximate: str) -> Parts:
    return decoder_parts(block.mlp, approximate)


class _FastLayer:
    """Mixin: ``train()``/``eval()`` reach the unregistered parts too (attention dropout)."""

    def train(self, mode: bool = True):
        super().train(mode)
        parts = self.__dict__[PARTS]
        for part in (parts.attention, parts.ffn):
            if part is not None:
                part.train(mode)
        return self


class _PostNormEncoder(_FastLayer):
    """The fused post-norm encoder layer (see the module docstring)."""

    def _fused_layer(self, hidden_states, mask):
        """The whole layer over a padded batch and its (B, S) key padding mask (or None),
        on the valid tokens only when that pays (``skips_padding``); a half-precision
        layer whose products run in fp32 on this host runs wholly in fp32, its output rounded
        once (``widens_layer``)."""
        parts = self.__dict__[PARTS]
        dtype = hidden_states.dtype
        in_fp32 = self._in_fp32(hidden_states)
        if (
            parts.skip_padding
            and isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and skips_padding(mask)
        ):
            batch, seq = mask.shape
            tokens, where, cu_seqlens, max_seqlen = unpad_input(hidden_states, mask)
            tokens = tokens.float() if in_fp32 else tokens
            x = self._fused_self_attention(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            return pad_input(self._fused_ffn(x).to(dtype), where, batch, seq)
        x = hidden_states.float() if in_fp32 else hidden_states
        return self._fused_ffn(self._fused_self_attention(x, mask)).to(dtype)

    def _in_fp32(self, x: torch.Tensor) -> bool:
        """Whether this layer, given ``x``, runs wholly in fp32: a half-precision layer whose
        largest product (its FFN's first) takes the widened form (``widens_layer``)."""
        fc1 = self.__dict__[PARTS].ffn.fc1
        return widens_layer(x, *weight_and_bias(fc1, "GeluFFN", "fc1"))

    def _fused_self_attention(self, x, key_padding_mask=None, **packed):
        """LN(x + dropout(attention(x))) over a padded (B, S, H) batch with its key padding
        mask, or over packed (T, H) tokens with ``cu_seqlens``/``max_seqlen``."""
        parts = self.__dict__[PARTS]
        a = parts.attention(x, key_padding_mask, **packed)  # includes the output projection
        if self.training and parts.out_dropout is not None:
            a = parts.out_dropout(a)
        return parts.attention_norm(a, residual=x)[0]

    def _fused_ffn(self, x):
        """LN(x + FFN(x)), the residual add in the second GEMM's epilogue."""
        parts = self.__dict__[PARTS]
        dropout = parts.ffn_dropout
        if self.training and dropout is not None and dropout.p > 0:
            # the dropout sits between fc2 and the residual add
            return parts.ffn_norm(dropout(parts.ffn(x)), residual=x)[0]
        return parts.ffn_norm(parts.ffn(x, residual=x))


class _BertCall(_PostNormEncoder):
    """BERT and the architectures that copied its layer (RoBERTa, XLM-RoBERTa, CamemBERT,
    ELECTRA): ``(hidden, mask, encoder_hidden_states, encoder_attention_mask, cache)``, with
    cross-attention in decoders and KV caches in generate."""

    @governed
    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, **kwargs):  # fmt: skip
        # The cache stays in kwargs under the name the encoder used (transformers renamed it
        # past_key_values -> cache), so transformers' modules below receive it unchanged.
        cross = encoder_hidden_states is not None and self.is_decoder
        if cross and not hasattr(self, "crossattention"):
            return super().forward(  # transformers' own error for this misuse
                hidden_states, attention_mask, encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, **kwargs,
            )  # fmt: skip
        unfused = unfused_self_attention_reason(attention_mask, kwargs)
        if unfused is None and not cross:
            return self._fused_layer(hidden_states, attention_mask)
        if unfused is None:
            x = self._fused_self_attention(hidden_states, attention_mask)
        else:
            _log_unfused(self, unfused)
            x, _ = self.attention(hidden_states, attention_mask, **kwargs)
        if cross:  # transformers' cross-attention module (on the "fastlm" attention function)
            x, _ = self.crossattention(
                x, None, encoder_hidden_states, encoder_attention_mask, **kwargs
            )
        return self._fused_ffn(x)


class _MaskCall(_PostNormEncoder):
    """Encoder-only layers called as ``(hidden, mask)`` (DistilBERT, ALBERT). A call the
    fused attention cannot serve runs transformers' forward (over fastlm's LayerNorms)."""

    @governed
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        unfused = unfused_self_attention_reason(attention_mask, kwargs)
        if unfused is not None:
            _log_unfused(self, unfused)
            return super().forward(hidden_states, attention_mask, **kwargs)
        return self._fused_layer(hidden_states, attention_mask)


class _MPNetCall(_PostNormEncoder):
    """MPNet: its self-attention adds a relative position bias to the scores, which no
    fastlm attention takes, so transformers' MPNetAttention runs it over the padded batch
    (on the model's own mask and bias); the FFN and both residual LayerNorms are fused, and
    the FFN (two thirds of the layer's GEMM work) runs on the valid tokens only when the
    padding pays for it, under the same rule as the other encoders."""

    @governed
    def forward(self, hidden_states, attention_mask=None, position_bias=None,
                output_attentions=False, **kwargs):  # fmt: skip
        parts = self.__dict__[PARTS]
        # the probabilities of padded queries in the next layer read this layer's padded rows
        returns_probs = output_attentions or attentions_requested()
        dtype = hidden_states.dtype
        # A half layer whose products run in fp32 runs wholly in fp32 (widens_layer):
        # transformers' attention too (its projections are fastlm.nn.Linear, which widen
        # their half weights for an fp32 input), unless it returns its probabilities,
        # which stay in the model's dtype as stock's.
        in_fp32 = not returns_probs and self._in_fp32(hidden_states)
        outputs = self.attention(
            hidden_states.float() if in_fp32 else hidden_states, attention_mask,
            position_bias=position_bias, output_attentions=output_attentions,
        )  # fmt: skip
        x = outputs[0]
        valid = _valid_tokens(attention_mask) if parts.skip_padding and not returns_probs else None
        return (on_valid_rows(self._fused_ffn, x, valid).to(dtype), *outputs[1:])


def _valid_tokens(mask) -> torch.Tensor | None:
    """The (B, S) valid tokens of a 4-D (B, 1, S, S) mask that only masks padded keys (every
    query row alike, as transformers' eager padding mask: 0 or True where allowed); None for
    any other mask (a user's 4-D mask may differ per query: no packing then). Read only where
    reads are free (eager CPU): ``skips_padding`` is asked next and says the same."""
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1):
        return None
    if mask.shape[2] != mask.shape[3] or not reads_are_free(mask):
        return None
    first = mask[:, :, :1, :]
    if not bool((mask == first).all()):
        return None
    row = first[:, 0, 0, :]
    return row if row.dtype == torch.bool else row == 0


class _GPT2Call(_FastLayer):
    """GPT-2's block: transformers' GPT2Attention (which owns the KV cache of generate())
    on the "fastlm" attention function, each residual add fused into the LayerNorm after
    it, the MLP as a GeluFFN."""

    @governed
    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=False, **kwargs):  # fmt: skip
        cross = encoder_hidden_states is not None
        if cross and not hasattr(self, "crossattention"):
            return super().forward(  # transformers' own error for this misuse
                hidden_states, cache, attention_mask, encoder_hidden_states,
                encoder_attention_mask, use_cache, **kwargs,
            )  # fmt: skip
        # The cache goes positionally: transformers renamed that argument (past_key_values -> cache).
        a, _ = self.attn(
            self.ln_1(hidden_states), cache, attention_mask=attention_mask, use_cache=use_cache,
            **kwargs,
        )  # fmt: skip
        if cross:  # transformers' GPT2Attention (on the "fastlm" attention function)
            x, r = self.ln_cross_attn(a, residual=hidden_states)
            a, _ = self.crossattention(
                x, cache, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
            )  # fmt: skip
            hidden_states = r
        x, r = self.ln_2(a, residual=hidden_states)
        parts = self.__dict__[PARTS]
        valid = attention_mask if parts.skip_padding else None
        return r + self.mlp.dropout(on_valid_rows(parts.ffn, x, valid))


class _DecoderMLP(_FastLayer):
    """A pre-norm decoder's MLP (GPT-BigCode): ``dropout(c_proj(gelu(c_fc(x))))`` as one
    GeluFFN. Only the MLP changes class, so the block's forward, its attention on the
    "fastlm" function and its KV cache stay transformers', whatever the block's signature.
    The padding mask reaches it from its backbone's forward (:func:`remember_padding`)."""

    @governed
    def forward(self, hidden_states):
        parts = self.__dict__[PARTS]
        valid = _BACKBONE_PADDING.get() if parts.skip_padding else None
        return self.dropout(on_valid_rows(parts.ffn, hidden_states, valid))


# The (B, S) padding mask of the decoder backbone forward in progress: its MLPs see only
# hidden states, and an MLP is row-wise, so it may run on the valid rows alone.
_BACKBONE_PADDING: ContextVar[torch.Tensor | None] = ContextVar("fastlm_padding", default=None)


def remember_padding(backbone, args, kwargs):
    """Forward pre-hook of a GPT-BigCode backbone (optimize.py registers it, revert removes
    it): publishes its ``attention_mask`` keyword for its MLPs, or None (a mask passed
    positionally is not seen: that forward runs unpacked). Set on every forward, so a mask
    never outlives the forward that brought it into use; nothing under torch.compile."""
    if not torch.compiler.is_compiling():
        mask = kwargs.get("attention_mask")
        _BACKBONE_PADDING.set(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)


def on_valid_rows(fn, x: torch.Tensor, valid) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` over (B, S, H) ``x``: on the valid rows only (packed,
    scattered back with zeros at padding) when ``valid`` is x's (B, S) padding mask and the
    padding pays for the move (``skips_padding``: eager CPU, enough padding); else on all.
    A decode step's mask spans the cache, not x: it runs unpacked."""
    if (
        isinstance(valid, torch.Tensor)
        and valid.shape == x.shape[:2]
        and x.dim() == 3
        and skips_padding(valid)
    ):
        batch, seq = valid.shape
        rows, where, _, _ = unpad_input(x, valid.bool())
        return pad_input(fn(rows), where, batch, seq)
    return fn(x)


_CALLS = {"bert": _BertCall, "mask": _MaskCall, "mpnet": _MPNetCall, "gpt2": _GPT2Call,
          "decoder": _DecoderMLP}  # fmt: skip


def make_parts(family: Family):
    """``(module, approximate) -> Parts`` for the module that changes class in ``family``."""
    if family.call == "gpt2":
        return gpt2_parts
    if family.call == "decoder":
        return decoder_parts
    return lambda layer, approximate: encoder_parts(layer, family.layout, approximate)


def fused_class(family: Family, base: type) -> type:
    """``FastLM<base>``: ``base`` (the transformers class named by ``family.layer``) run by
    fastlm; built once, kept in this module's namespace so that pickle finds it."""
    name = "FastLM" + base.__name__
    cls = globals().get(name)
    if cls is None:
        doc = f"A transformers {base.__name__} run by fastlm ({family.name}; see fastlm.integrations.hf.fused_layers)."
        cls = type(
            name,
            (_CALLS[family.call], base),
            {"__module__": __name__, "__qualname__": name, "__doc__": doc},
        )
        globals()[name] = cls
    return cls


def __getattr__(name: str):
    """Unpickling an optimized model looks its fused classes up here: build them."""
    for family in FAMILIES:
        if name == "FastLM" + family.layer:
            base = getattr(importlib.import_module(family.module), family.layer)
            return fused_class(family, base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unfused_self_attention_reason(attention_mask, kwargs: dict) -> str | None:
    """Why fastlm.nn.SelfAttention cannot serve this call (None when it can): it takes no KV
    cache, returns no probabilities, and masks only by key padding; a 4-D mask (another
    attention implementation's, or the user's), packed segment ids or a BlockMask go to
    transformers' attention module, which hands them to the configured attention function."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return "calls with a KV cache"
    if attentions_requested():
        return "output_attentions"
    if attention_mask is None or (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 2
        and attention_mask.dtype == torch.bool
    ):
        return None
    return "masks other than key padding (4-D, packed segment ids, block masks)"


def _log_unfused(layer: nn.Module, reason: str) -> None:
    log_once(
        "fastlm.optimize",
        f"{type(layer).__name__[len('FastLM') :]} self-attention through transformers' modules for {reason}",
    )
