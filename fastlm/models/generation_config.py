"""GenerationConfig: generate()'s defaults, read from ``generation_config.json`` or the model
config, with transformers' field names and default values (no transformers needed)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

# Keys transformers writes for its own bookkeeping; they carry no generation setting.
_BOOKKEEPING = {"transformers_version", "_from_model_config"}
# Settings that do not change the tokens: any value of use_cache (fastlm always decodes from
# its static cache, which gives the tokens a full recompute gives), and the per-step
# attention/hidden-state outputs when off (transformers 5 writes all three).
_NO_EFFECT = {"use_cache": None, "output_attentions": False, "output_hidden_states": False}


def _drop_no_effect(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in d.items()
        if k not in _BOOKKEEPING
        and not (k in _NO_EFFECT and (_NO_EFFECT[k] is None or v == _NO_EFFECT[k]))
    }


@dataclass
class GenerationConfig:
    """The generation knobs fastlm supports; transformers' defaults (``top_k=50`` included:
    it applies when ``do_sample=True``, as in transformers)."""

    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    output_scores: bool = False
    return_dict_in_generate: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "GenerationConfig") -> GenerationConfig:
        names = cls.field_names()
        d = _drop_no_effect(d)
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            warnings.warn(
                f"{where}: generation setting(s) {unknown} are not supported by fastlm and are "
                "not applied; passing them to generate() raises",
                stacklevel=3,
            )
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GenerationConfig:
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"GenerationConfig: {path} is not valid JSON ({exc})") from exc
        return cls.from_dict(d, where=os.fspath(path))

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """transformers' rule when a checkpoint has no generation_config.json: the special
        token ids come from the model config."""
        return cls(**{k: getattr(config, k) for k in ("bos_token_id", "eos_token_id",
                                                       "pad_token_id") if hasattr(config, k)})  # fmt: skip

    def update(self, **kwargs) -> GenerationConfig:
        """A copy with ``kwargs`` applied; an unknown name raises TypeError naming it."""
        kwargs = _drop_no_effect(kwargs)
        unknown = sorted(set(kwargs) - self.field_names())
        if unknown:
            raise TypeError(
                f"generate: argument(s) {unknown} are not supported by fastlm; supported: "
                f"{sorted(self.field_names())}"
            )
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        defaults = GenerationConfig()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
