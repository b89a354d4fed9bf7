"""The transformers architectures fastlm.optimize serves: one declaration per architecture.

A declaration says where an architecture keeps the parts fastlm fuses; the machinery that
fuses them (fused_layers.py, optimize.py) is shared. Two layouts:

* **post-norm encoder** (BERT and its descendants): ``LN(x + dropout(attention(x)))`` then
  ``LN(x + dropout(fc2(gelu(fc1(x)))))``. The layer runs as a fused layer class: attention
  as fastlm.nn.SelfAttention over its own q/k/v/output projections (with the padding
  skipped on eager CPU), the FFN as fastlm.nn.GeluFFN, each residual add inside the
  LayerNorm. An :class:`EncoderLayout` gives the attribute paths, relative to the layer.
* **pre-norm decoder** (GPT-2, GPT-BigCode): ``x + attention(LN(x))`` then
  ``x + mlp(LN(x))``. Attention and its KV cache stay transformers' modules on the "fastlm"
  attention function (grouped- and multi-query included); the MLP runs as GeluFFN.

Adding a BERT-like architecture is one :class:`Family` (and, when its attribute names
differ from BERT's, one :class:`EncoderLayout`) plus its tests; see ARCHITECTURE.md.
Nothing here imports transformers: families are matched by class name and module, so a
model family whose modeling file is never imported costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter


@dataclass(frozen=True)
class EncoderLayout:
    """Attribute paths of a post-norm encoder layer's parts, relative to the layer.

    ``attention``: the module holding ``query``/``key``/``value`` (names relative to it),
    its head count ``heads``, softmax ``scaling``, probability dropout ``probs_dropout`` and
    ``causal`` flag; None when the attention cannot run fused (MPNet adds a relative
    position bias to the scores), and then the layer's own attention module runs it.
    ``out_dropout`` / ``ffn_dropout``: the dropout on the attention output / FFN output
    before its residual add, None where the architecture has none.
    """

    attention: str | None
    query: str = "query"
    key: str = "key"
    value: str = "value"
    heads: str = "num_attention_heads"
    scaling: str = "scaling"
    probs_dropout: str = "dropout"
    causal: str = "is_causal"
    out: str = "attention.output.dense"
    out_dropout: str | None = "attention.output.dropout"
    attention_norm: str = "attention.output.LayerNorm"
    fc1: str = "intermediate.dense"
    fc2: str = "output.dense"
    ffn_dropout: str | None = "output.dropout"
    ffn_norm: str = "output.LayerNorm"

    def get(self, layer, path: str | None):
        """The module or value at ``path`` (None for None)."""
        return None if path is None else attrgetter(path)(layer)


BERT_LAYOUT = EncoderLayout(attention="attention.self")

DISTILBERT_LAYOUT = EncoderLayout(
    attention="attention",
    query="q_lin",
    key="k_lin",
    value="v_lin",
    heads="n_heads",
    out="attention.out_lin",
    out_dropout=None,  # DistilBERT: sa_layer_norm(out_lin(attention) + x)
    attention_norm="sa_layer_norm",
    fc1="ffn.lin1",
    fc2="ffn.lin2",
    ffn_dropout="ffn.dropout",
    ffn_norm="output_layer_norm",
)

ALBERT_LAYOUT = EncoderLayout(
    attention="attention",
    probs_dropout="attention_dropout",
    out="attention.dense",
    out_dropout="attention.output_dropout",
    attention_norm="attention.LayerNorm",
    fc1="ffn",
    fc2="ffn_output",
    ffn_dropout=None,  # ALBERT: full_layer_layer_norm(ffn_output(...) + x), no dropout
    ffn_norm="full_layer_layer_norm",
)

MPNET_LAYOUT = EncoderLayout(
    attention=None,  # scores + relative position bias: transformers' MPNetAttention runs it
    out="attention.attn.o",
    out_dropout="attention.dropout",
    attention_norm="attention.LayerNorm",
)


@dataclass(frozen=True)
class Family:
    """One transformers architecture.

    ``module`` / ``backbone`` / ``layer``: where transformers defines it, the base model
    class (found among a module's submodules, subclasses included) and its layer class.
    ``call``: how transformers calls the layer, which picks the fused class's forward:
    "bert" (``(hidden, mask, encoder_hidden_states, encoder_attention_mask, cache)``,
    cross-attention and KV caches), "mask" (``(hidden, mask)``, encoder only), "mpnet"
    (``(hidden, mask, position_bias)`` returning a tuple), "decoder" (pre-norm: the MLP
    module, class ``layer``, is what changes class). ``activation``: the config attribute
    naming the FFN activation. ``attention_function``: whether its attention runs through
    transformers' attention functions, so that "fastlm" can serve it.
    """

    name: str
    module: str
    backbone: str
    layer: str
    call: str
    layout: EncoderLayout | None = BERT_LAYOUT
    activation: str = "hidden_act"
    attention_function: bool = True
    not_fused: str = ""  # what stays transformers' (README table, logged once)


def _bert_like(name: str, module: str, prefix: str) -> Family:
    """An architecture whose layer is a copy of BERT's (same attribute names)."""
    return Family(
        name,
        module=f"transformers.models.{module}.modeling_{module}",
        backbone=f"{prefix}Model",
        layer=f"{prefix}Layer",
        call="bert",
    )


def _module(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


FAMILIES: tuple[Family, ...] = (
    _bert_like("BERT", "bert", "Bert"),
    _bert_like("RoBERTa", "roberta", "Roberta"),
    _bert_like("XLM-RoBERTa", "xlm_roberta", "XLMRoberta"),
    _bert_like("CamemBERT", "camembert", "Camembert"),
    _bert_like("ELECTRA", "electra", "Electra"),
    Family(
        "DistilBERT",
        module=_module("distilbert"),
        backbone="DistilBertModel",
        layer="TransformerBlock",
        call="mask",
        layout=DISTILBERT_LAYOUT,
        activation="activation",
    ),
    Family(
        "ALBERT",
        module=_module("albert"),
        backbone="AlbertModel",
        layer="AlbertLayer",
        call="mask",
        layout=ALBERT_LAYOUT,
    ),
    Family(
        "MPNet",
        module=_module("mpnet"),
        backbone="MPNetModel",
        layer="MPNetLayer",
        call="mpnet",
        layout=MPNET_LAYOUT,
        attention_function=False,
        not_fused="self-attention (relative position bias) left to transformers' eager attention",
    ),
    Family(
        "GPT-2",
        module=_module("gpt2"),
        backbone="GPT2Model",
        layer="GPT2Block",
        call="gpt2",
        layout=None,
        activation="activation_function",
    ),
    Family(
        "GPT-BigCode",
        module=_module("gpt_bigcode"),
        backbone="GPTBigCodeModel",
        layer="GPTBigCodeMLP",
        call="decoder",
        layout=None,
        activation="activation_function",
    ),
)


def family_of(module) -> Family | None:
    """The family whose backbone class ``module`` is an instance of (subclasses included)."""
    for cls in type(module).__mro__:
        for family in FAMILIES:
            if cls.__name__ == family.backbone and cls.__module__ == family.module:
                return family
    return None


def names() -> str:
    return ", ".join(f.name for f in FAMILIES)
