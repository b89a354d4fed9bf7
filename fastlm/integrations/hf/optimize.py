"""fastlm.optimize(hf_model) / fastlm.revert(hf_model): swap fastlm execution into the
transformers BERT and GPT-2 models inside a module, in place.

How: nothing is replaced. Each BertLayer / GPT2Block and each LayerNorm changes *class* to
a fastlm subclass defined below (``module.__class__ = ...``), and revert changes it back.
The module objects, their children, parameters, buffers, hooks, ``training`` flags and
gradient-checkpointing settings are the very same before, during and after, so state_dict
keys, optimizers and ``isinstance`` checks (output capturing, checkpointing) are
unaffected, and a state set while optimized survives revert. The subclasses live at module
level, so an optimized model pickles (torch.save) and unpickles wherever fastlm imports.

What runs differently while optimized:

* the attention implementation becomes "fastlm" (fastlm.attention with a (B, Sk) padding
  mask, see attention.py); the previous one comes back on revert;
* LayerNorms become fastlm.nn.LayerNorm (same parameters; called plainly they are
  nn.LayerNorm), and the layers fuse each residual add into the LayerNorm that follows it;
* a BERT layer runs its self-attention as fastlm.nn.SelfAttention over its query/key/value
  and output projections (causal for a decoder BERT) and its FFN as fastlm.nn.GeluFFN
  (bias + GELU and the residual add fused into the GEMMs); a GPT-2 block runs its MLP as
  fastlm.nn.GeluFFN and keeps transformers' GPT2Attention (which owns the KV cache of
  generate()) on the "fastlm" attention implementation. These nn modules wrap the layer's
  own children; they are kept in the layer's ``_fastlm_parts``, not registered as submodules
  (that would add state_dict keys);
* on eager CPU, a BERT layer given a padded batch on its fused path runs on the valid
  tokens only: it packs them (``unpad_input``), runs attention as ``attention_varlen`` and
  every GEMM and LayerNorm on the T valid rows, and scatters them back (``pad_input``).
  Padded positions of its output hold zeros (transformers computes values there that
  nothing should read: queries at padding); valid positions agree. The pack/scatter is
  two memory moves per layer against GEMMs that shrink with the padding fraction. On CUDA
  and under torch.compile, reading the mask to pack would be a sync or a graph break, so
  the layer attends over the padded batch with the key padding mask instead.

Per call, a BERT layer hands its self-attention to transformers' own BertAttention (which
runs on whatever attention implementation is configured, "fastlm" unless the user switched
it) when fastlm.nn.SelfAttention cannot serve the call: a KV cache (generate, beam search,
assisted decoding, dynamic or static caches), ``output_attentions``, or a mask other than
None / (B, S) key padding (the 4-D masks another implementation prepares after
``set_attn_implementation("eager"/"sdpa")``, user 4-D masks, packed segment ids). Its FFN
stays fused. Cross-attention (BERT decoders with ``add_cross_attention``, GPT-2 with
``add_cross_attention``, EncoderDecoderModel) always runs through transformers'
BertAttention / GPT2Attention on the "fastlm" attention function (Sq != Sk, encoder padding
mask, cached encoder keys), with the FFN (and in GPT-2 the residual adds into the
LayerNorms) fused around it. Each such reason is logged once (logger "fastlm", INFO).

Supported: every transformers BertModel and GPT2Model found among the submodules of the
given module (encoders, decoders, cross-attention; the bare models, all Bert*/GPT2* task
models, EncoderDecoderModel and user modules wrapping them). What cannot run fused is left
to transformers unchanged, logged once, never an error: a backbone whose self-attention
carries relative position embeddings (``position_embedding_type`` on the layers of
transformers versions that had them; transformers 5.x ignores that config key, and so does
fastlm), the layers of a model whose activation has no fused GELU kernel (their LayerNorms
and the attention function are still fastlm's), and any layer or LayerNorm whose class is a
subclass (its forward may differ), together with a layer whose LayerNorm is left. A module
containing no BertModel or GPT2Model raises NotImplementedError.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from fastlm.integrations.hf import register, require_transformers

require_transformers("fastlm.optimize")

from transformers.models.bert.modeling_bert import BertLayer, BertModel  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2Model  # noqa: E402

from fastlm.integrations.hf.attention import attentions_requested  # noqa: E402
from fastlm.integrations.hf.log import log_once  # noqa: E402
from fastlm.models.bert import skips_padding  # noqa: E402
from fastlm.models.config import gelu_approximate  # noqa: E402
from fastlm.nn import GeluFFN, SelfAttention  # noqa: E402
from fastlm.nn import LayerNorm as FastLayerNorm  # noqa: E402
from fastlm.ops.padding import pad_input, unpad_input  # noqa: E402

_STATE = "_fastlm_optimized"
_PARTS = "_fastlm_parts"


class _Parts(NamedTuple):
    """The fastlm nn modules a layer runs, over its own children (not registered)."""

    attention: SelfAttention | None
    ffn: GeluFFN


class _FastLayer:
    """Mixin: ``train()``/``eval()`` reach the unregistered parts too (attention dropout)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for part in self.__dict__[_PARTS]:
            if part is not None:
                part.train(mode)
        return self


class FastLMBertLayer(_FastLayer, BertLayer):
    """A transformers BertLayer run by fastlm (see the module docstring)."""

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
        unfused = _unfused_self_attention_reason(attention_mask, kwargs)
        if unfused is None and not cross and _skips_padding(attention_mask):
            batch, seq = attention_mask.shape
            tokens, where, cu_seqlens, max_seqlen = unpad_input(hidden_states, attention_mask)
            x = self._fused_self_attention(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            return pad_input(self._fused_ffn(x), where, batch, seq)
        if unfused is None:
            x = self._fused_self_attention(hidden_states, attention_mask)
        else:
            log_once(
                "fastlm.optimize",
                f"BERT self-attention through transformers' modules for {unfused}",
            )
            x, _ = self.attention(hidden_states, attention_mask, **kwargs)
        if cross:  # transformers' BertCrossAttention (on the "fastlm" attention function)
            x, _ = self.crossattention(
                x, None, encoder_hidden_states, encoder_attention_mask, **kwargs
            )
        return self._fused_ffn(x)

    def _fused_self_attention(self, x, key_padding_mask=None, **packed):
        """LN(x + dropout(attention(x))) over a padded (B, S, H) batch with its key padding
        mask, or over packed (T, H) tokens with ``cu_seqlens``/``max_seqlen``."""
        so = self.attention.output
        a = self.__dict__[_PARTS].attention(x, key_padding_mask, **packed)  # includes so.dense
        return so.LayerNorm(so.dropout(a), residual=x)[0]

    def _fused_ffn(self, x):
        """LN(x + FFN(x)), the residual add in the second GEMM's epilogue."""
        ffn, out = self.__dict__[_PARTS].ffn, self.output
        if self.training and out.dropout.p > 0:  # dropout sits between fc2 and the residual add
            return out.LayerNorm(out.dropout(ffn(x)), residual=x)[0]
        return out.LayerNorm(ffn(x, residual=x))


def _unfused_self_attention_reason(attention_mask, kwargs: dict) -> str | None:
    """Why fastlm.nn.SelfAttention cannot serve this call (None when it can): it takes no KV
    cache, returns no probabilities, and masks only by key padding; a 4-D mask (another
    attention implementation's, or the user's), packed segment ids or a BlockMask go to
    transformers' BertSelfAttention, which hands them to the configured attention function."""
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


class FastLMGPT2Block(_FastLayer, GPT2Block):
    """A transformers GPT2Block run by fastlm (see the module docstring)."""

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
        return r + self.mlp.dropout(self.__dict__[_PARTS].ffn(x))


def _skips_padding(mask) -> bool:
    """Whether a BERT layer runs on the valid tokens only: a (B, S) padding mask that can be
    read for free (eager CPU; see fastlm.models.bert.skips_padding). Elsewhere, or without
    padding (the mask hook drops an all-true mask), it attends over the padded batch."""
    return isinstance(mask, torch.Tensor) and mask.dim() == 2 and skips_padding(mask)


def _bert_parts(layer: BertLayer, approximate: str) -> _Parts:
    sa = layer.attention.self
    attention = SelfAttention.from_linears(
        (sa.query, sa.key, sa.value), layer.attention.output.dense, sa.num_attention_heads,
        causal=bool(sa.is_causal), dropout=sa.dropout.p, softmax_scale=sa.scaling,
    )  # fmt: skip
    attention.train(layer.training)
    ffn = GeluFFN.from_linears(layer.intermediate.dense, layer.output.dense, approximate)
    return _Parts(attention, ffn)


def _gpt2_parts(block: GPT2Block, approximate: str) -> _Parts:
    return _Parts(None, GeluFFN.from_linears(block.mlp.c_fc, block.mlp.c_proj, approximate))


class _Swaps:
    """The class changes made so far, to undo in reverse order. A module that is not exactly
    the expected transformers/torch class (a subclass may override forward, which fastlm
    would silently drop) is left as it is, logged once."""

    def __init__(self) -> None:
        self.done: list[tuple[nn.Module, type]] = []

    def swap(self, module: nn.Module, expected: type, fast: type, parts=None) -> bool:
        """Swaps ``module`` to ``fast``; False (nothing changed) when it is not an ``expected``.
        ``parts``: ``module -> _Parts``, the fastlm modules it runs (built only when swapping)."""
        if type(module) is not expected:
            _leave(
                type(module).__name__,
                f"it is not a {expected.__name__} (a subclass may override forward)",
            )
            return False
        if parts is not None:
            module.__dict__[_PARTS] = parts(module)
        self.done.append((module, expected))
        module.__class__ = fast
        return True

    def swap_layer_norm(self, module: nn.Module) -> bool:
        if len(getattr(module, "normalized_shape", ())) != 1:
            _leave(type(module).__name__, "it normalizes more than the last dimension")
            return False
        return self.swap(module, nn.LayerNorm, FastLayerNorm)

    def swap_layer(self, layer, expected: type, fast: type, parts, residual_norms) -> None:
        """Swaps the LayerNorms the fastlm layer calls with ``residual=`` (which only fastlm's
        LayerNorm takes), then the layer itself when ``parts`` (None: its activation has no
        fused kernel) and all of those norms could be swapped."""
        norms_swapped = all([self.swap_layer_norm(n) for n in residual_norms])  # tries each one
        if parts is not None and norms_swapped:
            self.swap(layer, expected, fast, parts)

    def undo(self) -> None:
        for module, original in reversed(self.done):
            module.__class__ = original
            module.__dict__.pop(_PARTS, None)


def _leave(what: str, why: str) -> None:
    log_once("fastlm.optimize", f"{what} left to transformers: {why}")


def _parts_or_none(make_parts, act, model: str):
    """``layer -> _Parts`` for the model's activation (a name, or a callable, which fastlm
    cannot see into), or None (logged) when GeluFFN has no kernel for it: those layers are
    left to transformers."""
    try:
        return partial(make_parts, approximate=gelu_approximate(act, model))
    except NotImplementedError as exc:
        _leave(f"{model} layers", str(exc))
        return None


def _optimize_bert(model: BertModel, swaps: _Swaps) -> bool:
    layers = model.encoder.layer
    # transformers < 5 computed relative position scores (position_embedding_type
    # "relative_key"/"relative_key_query") inside its eager self-attention; a layer that has
    # them cannot run on any registered attention function.
    positions = {getattr(la.attention.self, "position_embedding_type", "absolute") for la in layers}
    if positions - {"absolute"}:
        _leave(
            type(model).__name__,
            f"position_embedding_type {sorted(positions)} (only absolute runs fused)",
        )
        return False
    swaps.swap_layer_norm(model.embeddings.LayerNorm)
    bert_parts = _parts_or_none(_bert_parts, model.config.hidden_act, "BertModel")
    for layer in layers:
        if hasattr(layer, "crossattention"):  # called plainly, by transformers' BertSelfOutput
            swaps.swap_layer_norm(layer.crossattention.output.LayerNorm)
        residual_norms = [layer.attention.output.LayerNorm, layer.output.LayerNorm]
        swaps.swap_layer(layer, BertLayer, FastLMBertLayer, bert_parts, residual_norms)
    return True


def _optimize_gpt2(model: GPT2Model, swaps: _Swaps) -> bool:
    gpt2_parts = _parts_or_none(_gpt2_parts, model.config.activation_function, "GPT2Model")
    for block in model.h:
        swaps.swap_layer_norm(block.ln_1)  # called plainly
        residual_norms = [block.ln_2]
        if hasattr(block, "ln_cross_attn"):
            residual_norms.append(block.ln_cross_attn)
        swaps.swap_layer(block, GPT2Block, FastLMGPT2Block, gpt2_parts, residual_norms)
    swaps.swap_layer_norm(model.ln_f)
    return True


def optimize(model: nn.Module) -> nn.Module:
    """Run every transformers BERT/GPT-2 model inside ``model`` on fastlm kernels, in place;
    returns ``model``. A second call is a no-op; :func:`revert` undoes it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlm.optimize: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE, None) is not None:
        return model
    backbones = [m for m in model.modules() if isinstance(m, (BertModel, GPT2Model))]
    if not backbones:
        raise NotImplementedError(
            f"fastlm.optimize: supports transformers BERT and GPT-2 models; {type(model).__name__} contains neither"
        )
    register.register_if_available()
    if not register.is_registered():
        raise NotImplementedError(
            f"fastlm.optimize: attn_implementation='fastlm' is unavailable: {register.status()}"
        )
    swaps = _Swaps()
    try:
        served = [
            b for b in backbones
            if (_optimize_bert if isinstance(b, BertModel) else _optimize_gpt2)(b, swaps)
        ]  # fmt: skip
    except BaseException:
        swaps.undo()  # all or nothing
        raise
    previous = [(b, b.config._attn_implementation) for b in served]
    for backbone in served:
        backbone.set_attn_implementation("fastlm")
    object.__setattr__(model, _STATE, (swaps, previous))
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize`: the original classes and attention implementations come back;
    every other state (training mode, gradient checkpointing, parameters) is kept."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(
            f"fastlm.revert: {type(model).__name__} was not optimized by fastlm.optimize"
        )
    swaps, previous = state
    _check_not_reclassed(swaps)
    swaps.undo()
    for backbone, impl in previous:
        backbone.set_attn_implementation(impl)
    object.__delattr__(model, _STATE)
    return model


def _check_not_reclassed(swaps: _Swaps) -> None:
    """revert() sets each swapped module's class back. A wrapper that changed the class since
    (FSDP2's ``fully_shard`` makes an ``FSDP<class>`` subclass of it) would lose its own class
    silently, so that is refused, with nothing undone."""
    for module, _ in swaps.done:
        if not type(module).__module__.startswith("fastlm."):
            raise NotImplementedError(
                f"fastlm.revert: a module optimize() swapped is now a {type(module).__name__} "
                "(re-classed by a wrapper such as FSDP2's fully_shard); reverting would drop "
                "that class. Revert before wrapping the model."
            )
