"""``config.output_attentions = True`` on a model running attn_implementation="fastlm".

transformers' PreTrainedConfig refuses output_attentions for every attention implementation
but "eager": its ``output_attentions`` setter raises, and so does its class validator
``validate_output_attentions`` (run by ``save_pretrained``). The rule exists because sdpa
and flash attention cannot return probabilities; the "fastlm" attention function can (asked
for them, it computes them by an explicit softmax, see attention.py), so fastlm lets both
checks accept it too. Every other implementation keeps transformers' behaviour, and the
rest of the setter (the "eager" default when no implementation is set yet) is transformers'.

The strict-dataclass machinery of huggingface_hub copies each class's validators into its
``__class_validators__`` list when the class is defined, so the validator is replaced in the
lists of the config classes already defined; classes defined later inherit the new one.
"""

from __future__ import annotations

from fastlm.integrations.hf.register import NAME

_VALIDATOR = "validate_output_attentions"


def allow_output_attentions() -> None:
    """Let configs running "fastlm" set output_attentions=True (idempotent)."""
    from transformers.configuration_utils import PreTrainedConfig

    prop = PreTrainedConfig.__dict__.get("output_attentions")
    original_validate = PreTrainedConfig.__dict__.get(_VALIDATOR)
    if not isinstance(prop, property) or prop.fset is None or original_validate is None:
        return  # another transformers layout: its own rule stays
    if getattr(prop.fset, "_fastlm", False):
        return
    original_set = prop.fset

    def set_output_attentions(config, value: bool) -> None:
        if value and config._attn_implementation == NAME:
            config._output_attentions = value  # the attribute transformers' getter reads
        else:
            original_set(config, value)

    def validate_output_attentions(config) -> None:
        if config._attn_implementation != NAME:
            original_validate(config)

    set_output_attentions._fastlm = True
    PreTrainedConfig.output_attentions = property(
        prop.fget, set_output_attentions, doc=prop.__doc__
    )
    setattr(PreTrainedConfig, _VALIDATOR, validate_output_attentions)
    for cls in _with_subclasses(PreTrainedConfig):
        validators = cls.__dict__.get("__class_validators__")
        if validators is not None:
            cls.__class_validators__ = [
                validate_output_attentions if v is original_validate else v for v in validators
            ]


def _with_subclasses(cls: type) -> list[type]:
    found, todo = [], [cls]
    while todo:
        c = todo.pop()
        found.append(c)
        todo.extend(c.__subclasses__())
    return found
