"""fastlm.optimize(hf_model) / fastlm.revert(hf_model): swap fastlm execution into a
transformers BERT or GPT-2 in place.

What changes (weights are shared, never copied; every original module object stays
reachable and comes back on revert):

* the model's attention implementation becomes "fastlm" (fastlm.attention with a (B, Sk)
  padding mask, see attention.py); the previous one is restored by revert;
* each BertLayer / GPT2Block is replaced by a fastlm subclass of the same class whose
  children *are* the original submodules, so state_dict keys, parameters, hooks keyed on
  the class (output_hidden_states) and optimizers are unaffected. Its forward fuses the
  residual add into the LayerNorm (fastlm.layer_norm(..., residual=)) and runs the FFN as
  fastlm.gelu_ffn;
* other LayerNorms (embeddings, ln_f) become fastlm.nn.LayerNorm sharing the parameters.

Supported: BertModel and the Bert* task models built on it (encoder configuration), and
GPT2Model / GPT2LMHeadModel / other GPT2* models built on GPT2Model. Cross-attention and
other configurations raise NotImplementedError.
"""

from __future__ import annotations

from torch import nn

import fastlm
from fastlm.models.config import gelu_approximate
from fastlm.nn import LayerNorm as FastLayerNorm

_STATE = "_fastlm_optimized"


def _ln(ln: nn.LayerNorm, x, residual=None):
    return fastlm.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=residual)


def _adopt(cls: type, original: nn.Module) -> nn.Module:
    """An instance of fastlm subclass ``cls`` holding ``original``'s children and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(original.__dict__)
    new._modules = dict(original._modules)
    new._parameters = dict(original._parameters)
    new._buffers = dict(original._buffers)
    return new


def _bert_layer_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                        encoder_attention_mask=None, past_key_values=None, **kwargs):  # fmt: skip
    if encoder_hidden_states is not None or past_key_values is not None:
        raise NotImplementedError(
            "fastlm.optimize: BERT cross-attention / KV caches are not supported"
        )
    sa = self.attention.self
    b, s, _ = hidden_states.shape
    shape = (b, s, sa.num_attention_heads, sa.attention_head_size)
    q, k, v = (lin(hidden_states).view(shape) for lin in (sa.query, sa.key, sa.value))
    from fastlm.integrations.hf.attention import fastlm_attention_forward

    a, _ = fastlm_attention_forward(
        sa, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
        scaling=sa.scaling, dropout=sa.dropout.p if self.training else 0.0, is_causal=False,
    )  # fmt: skip
    so = self.attention.output
    x, _ = _ln(so.LayerNorm, so.dropout(so.dense(a.reshape(b, s, -1))), residual=hidden_states)
    fc1, out = self.intermediate.dense, self.output
    if out.dropout.p > 0 and self.training:
        h = fastlm.gelu_ffn(
            x,
            fc1.weight,
            fc1.bias,
            out.dense.weight,
            out.dense.bias,
            approximate=self._fastlm_approx,
        )
        return _ln(out.LayerNorm, out.dropout(h), residual=x)[0]
    z = fastlm.gelu_ffn(
        x,
        fc1.weight,
        fc1.bias,
        out.dense.weight,
        out.dense.bias,
        approximate=self._fastlm_approx,
        residual=x,
    )
    return _ln(out.LayerNorm, z)


def _gpt2_block_forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                        encoder_attention_mask=None, use_cache=False, **kwargs):  # fmt: skip
    if encoder_hidden_states is not None:
        raise NotImplementedError("fastlm.optimize: GPT-2 cross-attention is not supported")
    a, _ = self.attn(
        _ln(self.ln_1, hidden_states), past_key_values=past_key_values, attention_mask=attention_mask,
        use_cache=use_cache, **kwargs,
    )  # fmt: skip
    x, r = _ln(self.ln_2, a, residual=hidden_states)
    mlp = self.mlp
    m = fastlm.gelu_ffn(
        x, mlp.c_fc.weight.t(), mlp.c_fc.bias, mlp.c_proj.weight.t(), mlp.c_proj.bias,
        approximate=self._fastlm_approx,
    )  # fmt: skip
    return r + mlp.dropout(m)


def _fast_subclass(base: type, forward) -> type:
    # A subclass per HF class keeps isinstance checks (output capturing, gradient checkpointing).
    return type(
        f"FastLM{base.__name__}", (base,), {"forward": forward, "_fastlm_original_class": base}
    )


_SUBCLASSES: dict[type, type] = {}


def _swap(parent: nn.Module, name: str, new: nn.Module, record: list) -> None:
    record.append((parent, name, parent._modules[name]))
    parent._modules[name] = new


def _find_backbone(model: nn.Module):
    from transformers.models.bert.modeling_bert import BertModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

    for m in model.modules():
        if isinstance(m, (BertModel, GPT2Model)):
            return m
    raise NotImplementedError(
        f"fastlm.optimize: supports transformers BERT and GPT-2 models; {type(model).__name__} contains neither"
    )


def optimize(model: nn.Module) -> nn.Module:
    """Run ``model`` (a transformers BERT/GPT-2) on fastlm kernels, in place; returns it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlm.optimize: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE, None) is not None:
        return model
    from transformers.models.bert.modeling_bert import BertLayer, BertModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from fastlm.integrations.hf import register

    register.register_if_available()
    if not register.is_registered():
        raise NotImplementedError(
            f"fastlm.optimize: attn_implementation='fastlm' is unavailable: {register.status()}"
        )
    backbone = _find_backbone(model)
    cfg = model.config
    record: list = []
    if isinstance(backbone, BertModel):
        if (
            cfg.is_decoder
            or cfg.add_cross_attention
            or getattr(cfg, "position_embedding_type", "absolute") != "absolute"
        ):
            raise NotImplementedError(
                "fastlm.optimize: only encoder BERT with absolute positions is supported"
            )
        approx = gelu_approximate(cfg.hidden_act, "BertModel")
        for i, layer in enumerate(backbone.encoder.layer):
            cls = _SUBCLASSES.setdefault(
                type(layer), _fast_subclass(type(layer), _bert_layer_forward)
            )
            if not isinstance(layer, BertLayer):
                raise NotImplementedError(
                    f"fastlm.optimize: unexpected layer type {type(layer).__name__}"
                )
            new = _adopt(cls, layer)
            new._fastlm_approx = approx
            _swap(backbone.encoder.layer, str(i), new, record)
        _swap(
            backbone.embeddings,
            "LayerNorm",
            FastLayerNorm.from_torch(backbone.embeddings.LayerNorm),
            record,
        )
    else:
        if cfg.add_cross_attention:
            raise NotImplementedError(
                "fastlm.optimize: GPT-2 with cross-attention is not supported"
            )
        approx = gelu_approximate(cfg.activation_function, "GPT2Model")
        for i, block in enumerate(backbone.h):
            if not isinstance(block, GPT2Block):
                raise NotImplementedError(
                    f"fastlm.optimize: unexpected block type {type(block).__name__}"
                )
            cls = _SUBCLASSES.setdefault(
                type(block), _fast_subclass(type(block), _gpt2_block_forward)
            )
            new = _adopt(cls, block)
            new._fastlm_approx = approx
            _swap(backbone.h, str(i), new, record)
        _swap(backbone, "ln_f", FastLayerNorm.from_torch(backbone.ln_f), record)
    previous = model.config._attn_implementation
    _set_attn(model, "fastlm")
    object.__setattr__(model, _STATE, (record, previous))
    return model


def _set_attn(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover - older transformers 5.x
        model.config._attn_implementation = impl


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize`: the original modules and attention implementation come back."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(
            f"fastlm.revert: {type(model).__name__} was not optimized by fastlm.optimize"
        )
    record, previous = state
    for parent, name, original in reversed(record):
        parent._modules[name] = original
    _set_attn(model, previous)
    object.__delattr__(model, _STATE)
    return model
