"""Import fastlm from a plain source tree, without installing it.

pyproject.toml maps two top-level folders into the package: ``fastlm.kernels`` = kernels/
and ``fastlm.csrc`` = csrc/. An installed (or editable) fastlm carries that mapping; with
only ``PYTHONPATH=<repo>``, ``import fastlm.kernels`` fails. benchmarks/gpu_check.sh copies
this file into a throw-away venv (``venv --without-pip``: no ensurepip, no pip, no network)
as ``_fastlm_srcmap.py`` next to a .pth line calling ``install(<repo>)``, so every Python
process there (pytest-xdist workers included) resolves the mapping from pyproject.toml.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the GPU image has 3.12, CI 3.11
    tomllib = None


def package_dirs(repo: str) -> dict[str, str]:
    """{dotted name: folder} for the package-dir entries that differ from the dotted path."""
    if tomllib is None:
        return {
            "fastlm.kernels": os.path.join(repo, "kernels"),
            "fastlm.csrc": os.path.join(repo, "csrc"),
        }
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {
        name: os.path.join(repo, folder)
        for name, folder in mapping.items()
        if folder != name.replace(".", "/")
    }


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages; everything else is left to the normal path finders."""

    def __init__(self, dirs: dict[str, str]):
        self.dirs = dirs

    def find_spec(self, name, path=None, target=None):
        folder = self.dirs.get(name)
        if folder is None:
            return None
        init = os.path.join(folder, "__init__.py")
        if os.path.exists(init):
            return importlib.util.spec_from_file_location(
                name, init, submodule_search_locations=[folder]
            )
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)  # data-only (csrc/)
        spec.submodule_search_locations = [folder]
        return spec


def install(repo: str) -> None:
    """Put the repository on sys.path and the mapping on sys.meta_path (idempotent)."""
    if repo not in sys.path:
        sys.path.append(repo)
    if not any(isinstance(f, SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.append(SourceTreeFinder(package_dirs(repo)))
