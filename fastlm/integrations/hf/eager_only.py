"""Refuse attn_implementation="fastlm" at load time for models that run attention only eagerly.

transformers accepts any registered attention function for any model, but a model whose
attention does not go through transformers' attention functions (MPNet computes its scores
itself, adding a relative position bias) never calls it: the "fastlm" mask hook then hands
its eager attention a (B, S) padding mask where it expects a 4-D additive one, and a padded
batch fails deep inside the model. transformers refuses ``attn_implementation="sdpa"`` for
exactly these models (none of ``_supports_sdpa``, ``_supports_flash_attn``,
``_supports_flex_attn``, ``_supports_attention_backend`` is set), so fastlm refuses "fastlm"
for them the same way, with a ValueError when the model is built or switched
(``from_pretrained``, ``from_config``, ``set_attn_implementation``), saying what to use
instead. Every other request goes to transformers' own check unchanged.
"""

from __future__ import annotations

from fastlm.integrations.hf.register import NAME

_FLAGS = ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn",
          "_supports_attention_backend")  # fmt: skip


def runs_attention_functions(model_class: type) -> bool:
    """Whether transformers would let ``model_class`` run anything but eager attention."""
    return any(getattr(model_class, flag, False) for flag in _FLAGS)


def refuse_eager_only_models() -> None:
    """Wrap PreTrainedModel.get_correct_attn_implementation (idempotent)."""
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel.__dict__.get("get_correct_attn_implementation")
    if original is None or getattr(original, "_fastlm", False):
        return  # another transformers layout (its own rule stays), or done already

    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        if requested_attention == NAME and not runs_attention_functions(type(self)):
            raise ValueError(
                f'{type(self).__name__} does not support attn_implementation="{NAME}": its '
                "attention does not run through transformers' attention functions (transformers "
                'supports only attn_implementation="eager" for it). Load it without '
                "attn_implementation and call fastlm.optimize(model), which fuses its "
                "LayerNorms and feed-forward and leaves its attention to transformers."
            )
        return original(self, requested_attention, *args, **kwargs)

    get_correct_attn_implementation._fastlm = True
    get_correct_attn_implementation.__doc__ = original.__doc__
    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation
