"""Register attn_implementation="fastlm" with transformers, without making ``import fastlm`` slow.

``import transformers`` costs about a second and its modeling utilities several more, so
fastlm never imports it. Instead:

* if transformers' ``modeling_utils`` / ``masking_utils`` are already imported, register now;
* otherwise install a post-import hook (a ``sys.meta_path`` finder that only reacts to those
  two module names) that registers the attention function right after
  ``transformers.modeling_utils`` executes and the mask function right after
  ``transformers.masking_utils`` does. ``AutoModel.from_pretrained(...,
  attn_implementation="fastlm")`` then works whenever ``import fastlm`` happened first, at
  no import-time cost, and nothing happens if transformers is never used or not installed.

Registering the attention function also lets configs running "fastlm" set
``output_attentions=True``, which transformers allows only for "eager"
(see output_attentions.py), and makes models that run attention only eagerly (MPNet)
refuse "fastlm" when loaded, as transformers refuses "sdpa" for them (see eager_only.py).

Gate: transformers >= 5.0 (the AttentionInterface / AttentionMaskInterface API this
integration targets; tested with 5.17 and 5.23). An older version gets a logged warning
saying so, and no registration.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

logger = logging.getLogger("fastlm")

NAME = "fastlm"
MIN_VERSION = (5, 0)
_ATTN_MODULE = "transformers.modeling_utils"
_MASK_MODULE = "transformers.masking_utils"

_done: set[str] = set()
_status: dict[str, str] = {}


def _version_ok() -> bool:
    import transformers

    raw = getattr(transformers, "__version__", "0")
    parts = []
    for p in raw.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_VERSION:
        msg = (
            f"fastlm: transformers {raw} is too old for attn_implementation='fastlm' "
            f"(needs >= {'.'.join(map(str, MIN_VERSION))}); not registering"
        )
        if "version" not in _status:
            logger.warning(msg)
        _status["version"] = msg
        return False
    return True


def _register(module_name: str) -> None:
    if module_name in _done:
        return
    try:
        if not _version_ok():
            return
        from fastlm.integrations.hf.attention import fastlm_attention_forward, fastlm_mask

        if module_name == _ATTN_MODULE:
            from transformers.modeling_utils import AttentionInterface

            from fastlm.integrations.hf.eager_only import refuse_eager_only_models
            from fastlm.integrations.hf.output_attentions import allow_output_attentions

            AttentionInterface.register(NAME, fastlm_attention_forward)
            allow_output_attentions()
            refuse_eager_only_models()
        else:
            from transformers.masking_utils import AttentionMaskInterface

            AttentionMaskInterface.register(NAME, fastlm_mask)
        _done.add(module_name)
        _status[module_name] = "registered"
    except Exception as exc:  # never break the user's transformers import
        _status[module_name] = f"failed: {exc.__class__.__name__}: {exc}"
        logger.warning(
            "fastlm: could not register attn_implementation='fastlm' (%s)", _status[module_name]
        )


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of the two target modules so that the
    registration runs right after the module body."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in (_ATTN_MODULE, _MASK_MODULE) or fullname in _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module, _orig=original, _name=fullname):
            _orig(module)
            _register(_name)

        loader.exec_module = exec_module
        return spec


_hook = _PostImportHook()


def register_if_available() -> None:
    """Register now for what transformers already imported; hook the rest. Cheap, never raises."""
    for name in (_ATTN_MODULE, _MASK_MODULE):
        if name in sys.modules:
            _register(name)
    if (
        len(_done) < 2
        and _hook not in sys.meta_path
        and not any(s.startswith("version") for s in _status)
    ):
        sys.meta_path.insert(0, _hook)


def status() -> dict[str, str]:
    """What happened so far, per transformers module (for `python -m fastlm info`)."""
    return dict(_status)


def is_registered() -> bool:
    return len(_done) == 2
