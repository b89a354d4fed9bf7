"""Docstrings as ``--help`` text. argparse prints a description as it is given, so the
reStructuredText and Markdown markup of a module docstring (double-backtick literals, roles
such as :mod: or :class:, single-backtick code) would reach the terminal raw; the commands
keep their docstring as the one description and show it through :func:`plain`."""

from __future__ import annotations

import inspect
import re

_ROLE = re.compile(r":[a-z]+:`([^`]*)`")  # :mod:`fastlm.demo.bert` -> fastlm.demo.bert
_CODE = re.compile(r"`{1,2}([^`]+)`{1,2}")  # ``code`` or `code` -> code


def plain(doc: str) -> str:
    """``doc`` without its markup, dedented: what ``argparse`` should print."""
    return inspect.cleandoc(_CODE.sub(r"\1", _ROLE.sub(r"\1", doc)))
