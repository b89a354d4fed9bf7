"""Import ``fastlm.kernels`` and ``fastlm.csrc`` from a source checkout.

pyproject.toml maps two top-level folders of the repository into the package:
``fastlm.kernels`` = kernels/ (Triton) and ``fastlm.csrc`` = csrc/ (CUDA sources). A wheel
carries them as real subfolders of fastlm/. In a checkout (an editable install, or
``PYTHONPATH=<repo>`` as benchmarks/gpu_check.sh runs it) they sit beside fastlm/, and
neither has an ``__init__.py``: a regular top-level package named ``kernels`` would hide
Hugging Face's ``kernels`` whenever the repository root is on sys.path, and transformers
imports that package while loading any model. setuptools' editable finder cannot serve a
mapped subpackage without an ``__init__.py``, so fastlm serves the two itself: when the
folder fastlm/ has no kernels/ of its own but pyproject.toml maps one, ``install`` adds a
finder for exactly the mapped names. An installed wheel never needs it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PACKAGE_DIR)
# The same mapping as [tool.setuptools] package-dir in pyproject.toml (a test checks they agree).
MAPPED = {"fastlm.kernels": "kernels", "fastlm.csrc": "csrc"}


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped subpackages as namespace packages over their repository folders."""

    def __init__(self, folders: dict[str, str]):
        self.folders = folders

    def find_spec(self, name, path=None, target=None):
        folder = self.folders.get(name)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [folder]
        return spec


def source_folders() -> dict[str, str]:
    """{dotted name: folder} when fastlm runs from a checkout, else {} (an installed wheel)."""
    if os.path.isdir(os.path.join(PACKAGE_DIR, "kernels")):
        return {}
    folders = {name: os.path.join(REPO, rel) for name, rel in MAPPED.items()}
    if not all(os.path.isdir(f) for f in folders.values()):
        return {}
    return folders


def install() -> None:
    """Add the finder once, after the others (it only answers for the mapped names)."""
    folders = source_folders()
    if folders and not any(isinstance(f, SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.append(SourceTreeFinder(folders))
