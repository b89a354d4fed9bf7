"""One-time logging of the Hugging Face integration's fallbacks (logger "fastlm", INFO)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("fastlm")
_logged: set[tuple[str, str]] = set()


def log_once(topic: str, reason: str) -> None:
    """Logs ``topic: reason`` the first time it happens, so a fallback taken on every call
    (a decode step, a layer) costs a set lookup and says so once. Nothing is logged while
    torch.compile traces: a logging call there would break the graph."""
    key = (topic, reason)
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.info("%s: %s", topic, reason)
