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
* LayerNorms become fastlm.nn.LayerNorm (same parameters), and the layers fuse each
  residual add into the LayerNorm that follows it;
* a BERT layer runs its self-attention as fastlm.nn.SelfAttention over its query/key/value
  and output projections and its FFN as fastlm.nn.GeluFFN (bias + GELU and the residual
  add fused into the GEMMs); a GPT-2 block runs its MLP as fastlm.nn.GeluFFN and keeps
  transformers' GPT2Attention (which owns the KV cache of generate()) on the "fastlm"
  attention implementation. These nn modules wrap the layer's own children; they are kept
  in the layer's ``_fastlm_parts``, not registered as submodules (that would add
  state_dict keys).

Supported: every transformers BertModel (encoder configuration, absolute positions) and
GPT2Model (no cross-attention) found among the submodules of the given module: the bare
models, the Bert*/GPT2* task models, and user modules wrapping them. Other configurations
raise NotImplementedError.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from fastlm.integrations.hf import register, require_transformers

require_transformers("fastlm.optimize")

from transformers.models.bert.modeling_bert import BertLayer, BertModel  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2Model  # noqa: E402

from fastlm.models.config import gelu_approximate  # noqa: E402
from fastlm.nn import GeluFFN, SelfAttention  # noqa: E402
from fastlm.nn import LayerNorm as FastLayerNorm  # noqa: E402

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
        if encoder_hidden_states is not None or _cache_in(kwargs):
            raise NotImplementedError(
                "fastlm.optimize: BERT cross-attention / KV caches are not supported"
            )
        parts: _Parts = self.__dict__[_PARTS]
        so, out = self.attention.output, self.output
        a = parts.attention(hidden_states, attention_mask)  # includes so.dense
        x, _ = so.LayerNorm(so.dropout(a), residual=hidden_states)
        if self.training and out.dropout.p > 0:  # dropout sits between fc2 and the residual add
            return out.LayerNorm(out.dropout(parts.ffn(x)), residual=x)[0]
        return out.LayerNorm(parts.ffn(x, residual=x))


class FastLMGPT2Block(_FastLayer, GPT2Block):
    """A transformers GPT2Block run by fastlm (see the module docstring)."""

    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=False, **kwargs):  # fmt: skip
        if encoder_hidden_states is not None:
            raise NotImplementedError("fastlm.optimize: GPT-2 cross-attention is not supported")
        # The cache goes positionally: transformers renamed that argument (past_key_values -> cache).
        a, _ = self.attn(
            self.ln_1(hidden_states), cache, attention_mask=attention_mask, use_cache=use_cache,
            **kwargs,
        )  # fmt: skip
        x, r = self.ln_2(a, residual=hidden_states)
        return r + self.mlp.dropout(self.__dict__[_PARTS].ffn(x))


def _cache_in(kwargs: dict) -> bool:
    return kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None


def _bert_parts(layer: BertLayer, approximate: str) -> _Parts:
    sa = layer.attention.self
    attention = SelfAttention.from_linears(
        (sa.query, sa.key, sa.value), layer.attention.output.dense, sa.num_attention_heads,
        dropout=sa.dropout.p, softmax_scale=sa.scaling,
    )  # fmt: skip
    attention.train(layer.training)
    ffn = GeluFFN.from_linears(layer.intermediate.dense, layer.output.dense, approximate)
    return _Parts(attention, ffn)


def _gpt2_parts(block: GPT2Block, approximate: str) -> _Parts:
    return _Parts(None, GeluFFN.from_linears(block.mlp.c_fc, block.mlp.c_proj, approximate))


class _Swaps:
    """The class changes made so far, to undo in reverse order."""

    def __init__(self) -> None:
        self.done: list[tuple[nn.Module, type]] = []

    def swap(self, module: nn.Module, expected: type, fast: type, parts: _Parts | None = None):
        if type(module) is not expected:
            raise NotImplementedError(
                f"fastlm.optimize: expected a {expected.__name__}, got {type(module).__name__} "
                "(a subclass may override forward; fastlm would silently drop that)"
            )
        if parts is not None:
            module.__dict__[_PARTS] = parts
        self.done.append((module, expected))
        module.__class__ = fast

    def undo(self) -> None:
        for module, original in reversed(self.done):
            module.__class__ = original
            module.__dict__.pop(_PARTS, None)


def _optimize_bert(model: BertModel, swaps: _Swaps) -> None:
    cfg = model.config
    if cfg.is_decoder or cfg.add_cross_attention or getattr(cfg, "position_embedding_type", "absolute") != "absolute":  # fmt: skip
        raise NotImplementedError(
            "fastlm.optimize: only encoder BERT with absolute positions is supported"
        )
    approximate = gelu_approximate(cfg.hidden_act, "BertModel")
    swaps.swap(model.embeddings.LayerNorm, nn.LayerNorm, FastLayerNorm)
    for layer in model.encoder.layer:
        swaps.swap(layer, BertLayer, FastLMBertLayer, _bert_parts(layer, approximate))
        swaps.swap(layer.attention.output.LayerNorm, nn.LayerNorm, FastLayerNorm)
        swaps.swap(layer.output.LayerNorm, nn.LayerNorm, FastLayerNorm)


def _optimize_gpt2(model: GPT2Model, swaps: _Swaps) -> None:
    cfg = model.config
    if cfg.add_cross_attention:
        raise NotImplementedError("fastlm.optimize: GPT-2 with cross-attention is not supported")
    approximate = gelu_approximate(cfg.activation_function, "GPT2Model")
    for block in model.h:
        swaps.swap(block, GPT2Block, FastLMGPT2Block, _gpt2_parts(block, approximate))
        swaps.swap(block.ln_1, nn.LayerNorm, FastLayerNorm)
        swaps.swap(block.ln_2, nn.LayerNorm, FastLayerNorm)
    swaps.swap(model.ln_f, nn.LayerNorm, FastLayerNorm)


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
        for backbone in backbones:
            (_optimize_bert if isinstance(backbone, BertModel) else _optimize_gpt2)(backbone, swaps)
    except BaseException:
        swaps.undo()  # all or nothing
        raise
    previous = [(b, b.config._attn_implementation) for b in backbones]
    for backbone in backbones:
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
