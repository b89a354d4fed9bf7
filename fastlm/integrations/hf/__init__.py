"""The Hugging Face transformers integration (the ``hf`` extra: ``pip install 'fastlm[hf]'``)."""

from __future__ import annotations

INSTALL_HINT = "pip install 'fastlm[hf]' (or: pip install transformers safetensors)"


def require_transformers(feature: str) -> None:
    """Raise ModuleNotFoundError saying what to install when transformers is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"{feature} needs the transformers package, which is not installed: {INSTALL_HINT}",
            name="transformers",
        ) from exc
