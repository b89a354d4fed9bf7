"""fastlm.optimize(hf_model) / fastlm.revert(hf_model): swap fastlm execution into the
transformers models inside a module, in place, for every architecture declared in
families.py: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT, ALBERT, MPNet
(encoders), GPT-2 and GPT-BigCode (decoders).

How: nothing is replaced. Each layer (or, in GPT-BigCode, each MLP) and each LayerNorm
changes *class* to a fastlm subclass (``module.__class__ = ...``; fused_layers.py), and
revert changes it back. The module objects, their children, parameters, buffers, hooks,
``training`` flags and gradient-checkpointing settings are the very same before, during and
after, so state_dict keys, optimizers and ``isinstance`` checks (output capturing,
checkpointing) are unaffected, and a state set while optimized survives revert. The fused
classes are importable from fused_layers by name, so an optimized model pickles
(torch.save) and unpickles wherever fastlm imports.

What runs differently while optimized:

* the attention implementation becomes "fastlm" (fastlm.attention with a (B, Sk) padding
  mask, see attention.py) for every family whose attention runs through transformers'
  attention functions (all but MPNet); the previous one comes back on revert;
* every LayerNorm of the backbone becomes fastlm.nn.LayerNorm (same parameters; called
  plainly it is nn.LayerNorm), and the fused layers add each residual inside the LayerNorm
  that follows it;
* every plain nn.Linear and Conv1D of the transformers model (heads and poolers included;
  the projections of MPNet's, GPT-2's and GPT-BigCode's attention) computes the same
  product through fastlm.ops.linear (projections.py): on CPU in the form this host computes
  fastest (a bf16 model in fp32 math where the host has no fast bf16 GEMM);
* a post-norm encoder layer runs its self-attention as fastlm.nn.SelfAttention over its
  own projections (causal in a decoder BERT/RoBERTa) and its FFN as fastlm.nn.GeluFFN
  (bias + GELU and the residual add fused into the GEMMs), on the valid tokens only when
  the padding pays for it on eager CPU; MPNet keeps transformers' attention (it adds a
  relative position bias) over the padded batch and fuses the rest, its FFN on the valid
  tokens only where the padding pays. A GPT-2 block keeps transformers'
  GPT2Attention (which owns the KV cache of generate()) on the "fastlm" attention function
  and runs its MLP as a GeluFFN; GPT-BigCode likewise, its multi-query attention served by
  fastlm's grouped-query kernels. Their MLPs (row-wise) run on the valid rows of a padded
  prefill where the padding pays; GPT-BigCode's learn the padding mask from a forward
  pre-hook on the backbone (removed by revert). The nn modules wrap the layer's own children; they are
  kept in the layer's ``_fastlm_parts``, not registered as submodules (that would add
  state_dict keys).

Per call, a layer hands its self-attention to transformers' own module when
fastlm.nn.SelfAttention cannot serve the call: a KV cache (generate, beam search, assisted
decoding, dynamic or static caches), ``output_attentions``, or a mask other than None /
(B, S) key padding (the 4-D masks another implementation prepares after
``set_attn_implementation("eager"/"sdpa")``, user 4-D masks, packed segment ids).
Cross-attention (BERT-like decoders with ``add_cross_attention``, GPT-2 with
``add_cross_attention``, EncoderDecoderModel) always runs through transformers' modules on
the "fastlm" attention function, with the FFN (and in GPT-2 the residual adds into the
LayerNorms) fused around it. Each such reason is logged once (logger "fastlm", INFO).

What cannot run fused is left to transformers unchanged, logged once, never an error: a
backbone whose self-attention carries relative position embeddings
(``position_embedding_type`` on the layers of transformers versions that had them;
transformers 5.x ignores that config key, and so does fastlm), the layers of a model whose
activation has no fused GELU kernel (their LayerNorms and the attention function are still
fastlm's), and any layer or LayerNorm whose class is a subclass (its forward may differ),
together with a layer whose LayerNorm is left. A module containing no model of a declared
family raises NotImplementedError.
"""

from __future__ import annotations

import sys
from functools import partial

from torch import nn

from fastlm.integrations.hf import register, require_transformers

require_transformers("fastlm.optimize")

from fastlm.integrations.hf import fused_layers  # noqa: E402
from fastlm.integrations.hf.families import Family, family_of, names  # noqa: E402
from fastlm.integrations.hf.fused_layers import PARTS  # noqa: E402
from fastlm.integrations.hf.log import log_once  # noqa: E402
from fastlm.integrations.hf.projections import Conv1D, FastLMConv1D  # noqa: E402
from fastlm.models.config import gelu_approximate  # noqa: E402
from fastlm.nn import LayerNorm as FastLayerNorm  # noqa: E402
from fastlm.nn import Linear as FastLinear  # noqa: E402

_STATE = "_fastlm_optimized"


class _Swaps:
    """The class changes made so far, to undo in reverse order. A module that is not exactly
    the expected transformers/torch class (a subclass may override forward, which fastlm
    would silently drop) is left as it is, logged once."""

    def __init__(self) -> None:
        self.done: list[tuple[nn.Module, type]] = []
        self.hooks: list = []  # hook handles, removed by undo()

    def swap(self, module: nn.Module, expected: type, fast: type, parts=None) -> bool:
        """Swaps ``module`` to ``fast``; False (nothing changed) when it is not an ``expected``.
        ``parts``: ``module -> Parts``, the fastlm modules it runs (built only when swapping)."""
        if type(module) is not expected:
            _leave(
                type(module).__name__,
                f"it is not a {expected.__name__} (a subclass may override forward)",
            )
            return False
        if parts is not None:
            module.__dict__[PARTS] = parts(module)
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

    def swap_projections(self, model: nn.Module) -> None:
        """Every plain nn.Linear and transformers Conv1D inside ``model`` (projections the
        fused layers do not call, poolers, heads): projections.py computes the same product
        in this host's faster form. Subclasses (quantized or adapter layers) are skipped
        silently: they are not products fastlm knows."""
        for module in model.modules():
            if type(module) is nn.Linear:
                self.swap(module, nn.Linear, FastLinear)
            elif type(module) is Conv1D:
                self.swap(module, Conv1D, FastLMConv1D)

    def undo(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for module, original in reversed(self.done):
            module.__class__ = original
            module.__dict__.pop(PARTS, None)


def _leave(what: str, why: str) -> None:
    log_once("fastlm.optimize", f"{what} left to transformers: {why}")


def _parts_or_none(family: Family, config):
    """``layer -> Parts`` for the model's activation (a name, or a callable, which fastlm
    cannot see into), or None (logged) when GeluFFN has no kernel for it: those layers are
    left to transformers."""
    try:
        approximate = gelu_approximate(getattr(config, family.activation), family.backbone)
    except NotImplementedError as exc:
        _leave(f"{family.backbone} layers", str(exc))
        return None
    return partial(fused_layers.make_parts(family), approximate=approximate)


def _keeping_padded_rows(make):
    return lambda layer: make(layer)._replace(skip_padding=False)


def _residual_norms(family: Family, layer: nn.Module) -> list[nn.Module]:
    """The LayerNorms the fused class calls with ``residual=``."""
    if family.layout is not None:
        return [family.layout.get(layer, family.layout.attention_norm),
                family.layout.get(layer, family.layout.ffn_norm)]  # fmt: skip
    if family.call == "gpt2":
        return [layer.ln_2] + ([layer.ln_cross_attn] if hasattr(layer, "ln_cross_attn") else [])
    return []


def _relative_positions(family: Family, layers: list[nn.Module]) -> set[str]:
    """transformers < 5 computed relative position scores (position_embedding_type
    "relative_key"/"relative_key_query") inside the eager self-attention of BERT-like
    layers; a layer that has them cannot run on any registered attention function."""
    layout = family.layout
    if layout is None or layout.attention is None:
        return set()
    found = {
        getattr(layout.get(la, layout.attention), "position_embedding_type", "absolute")
        for la in layers
    }
    return found - {"absolute"}


def _under_padding_readers(model: nn.Module) -> set[int]:
    """ids of the modules inside a model whose head reads hidden states at padded positions,
    so that its backbone must compute them as transformers does (the padded layout), not
    leave zeros there (the packed one):

    * question answering: its loss is a softmax over every position, padded ones included;
    * a decoder's sequence classifier (GPT-2, GPT-BigCode): it pools the last token whose id
      is not ``pad_token_id``, which is a padded position whenever the batch was padded
      with another id (or the config has none)."""
    found = set()
    for module in model.modules():
        name = type(module).__name__
        reads = name.endswith("ForQuestionAnswering") or (
            name.endswith("ForSequenceClassification")
            and any((f := family_of(m)) is not None and f.layout is None for m in module.modules())
        )
        if reads:
            found.update(id(m) for m in module.modules())
    return found


def _optimize_backbone(
    backbone: nn.Module, family: Family, swaps: _Swaps, skip_padding: bool
) -> bool:
    """Swaps the layers, then every other LayerNorm of ``backbone``; False (nothing changed)
    when the whole backbone is left to transformers. ``skip_padding``: whether its layers
    may run packed (see fused_layers)."""
    layer_cls = getattr(sys.modules[family.module], family.layer)
    # modules() yields a shared module once (ALBERT runs one layer object many times)
    layers = [m for m in backbone.modules() if isinstance(m, layer_cls)]
    positions = _relative_positions(family, layers)
    if positions:
        _leave(type(backbone).__name__,
               f"position_embedding_type {sorted(positions)} (only absolute runs fused)")  # fmt: skip
        return False
    if family.not_fused:
        log_once("fastlm.optimize", f"{family.name}: {family.not_fused}")
    parts = _parts_or_none(family, backbone.config)
    if parts is not None and not skip_padding:
        parts = _keeping_padded_rows(parts)
    for layer in layers:
        fast = fused_layers.fused_class(family, layer_cls)
        swaps.swap_layer(layer, layer_cls, fast, parts, _residual_norms(family, layer))
    if family.call == "decoder" and parts is not None:  # its MLPs learn the padding here
        hook = fused_layers.remember_padding
        swaps.hooks.append(backbone.register_forward_pre_hook(hook, with_kwargs=True))
    for module in backbone.modules():  # those called plainly: embeddings, final norms, ...
        if isinstance(module, nn.LayerNorm) and not isinstance(module, FastLayerNorm):
            swaps.swap_layer_norm(module)
    return True


def _models_holding(model: nn.Module, backbones: list[nn.Module]) -> list[nn.Module]:
    """The outermost transformers models inside ``model`` (``model`` itself, a
    SentenceTransformer's ``auto_model``, ...) that hold one of ``backbones``, heads
    included; a user's own modules around them are not fastlm's to change."""
    from transformers import PreTrainedModel

    inside = {id(b) for b in backbones}
    found: list[nn.Module] = []
    claimed: set[int] = set()
    for module in model.modules():  # parents come before their children
        if id(module) in claimed or not isinstance(module, PreTrainedModel):
            continue
        members = {id(m) for m in module.modules()}
        if members & inside:
            found.append(module)
            claimed |= members
    return found


def optimize(model: nn.Module) -> nn.Module:
    """Run every transformers model of a family fastlm serves (see families.py) inside
    ``model`` on fastlm kernels, in place; returns ``model``. A second call is a no-op;
    :func:`revert` undoes it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlm.optimize: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE, None) is not None:
        return model
    backbones = [(m, f) for m in model.modules() if (f := family_of(m)) is not None]
    if not backbones:
        raise NotImplementedError(
            f"fastlm.optimize: supports the transformers models of {names()}; "
            f"{type(model).__name__} contains none of them"
        )
    register.register_if_available()
    if not register.is_registered():
        raise NotImplementedError(
            f"fastlm.optimize: attn_implementation='fastlm' is unavailable: {register.status()}"
        )
    swaps = _Swaps()
    try:
        readers = _under_padding_readers(model)
        served = [
            (b, f) for b, f in backbones if _optimize_backbone(b, f, swaps, id(b) not in readers)
        ]
        for holder in _models_holding(model, [b for b, _ in served]):
            swaps.swap_projections(holder)
    except BaseException:
        swaps.undo()  # all or nothing
        raise
    switched = [b for b, f in served if f.attention_function]
    previous = [(b, b.config._attn_implementation) for b in switched]
    for backbone in switched:
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
