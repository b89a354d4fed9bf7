"""Build script: only the optional CUDA extension lives here.

A plain ``pip install .`` is pure Python (metadata is in pyproject.toml) and never imports
torch. ``FASTLM_BUILD_CUDA=1 pip install --no-build-isolation .`` also compiles csrc/ into
``fastlm._C`` with torch's CUDAExtension (ninja; ``MAX_JOBS`` honoured; archs from
``FASTLM_CUDA_ARCHS``, else ``TORCH_CUDA_ARCH_LIST``, else 8.0;9.0). torch is imported only
on that path, so it never becomes a build requirement. ``fastlm._C`` holds only the
TORCH_LIBRARY(fastlm_cuda) operators (no Python module init): fastlm/_cuda_ext.py loads it
with torch.ops.load_library.
"""

import os

from setuptools import setup


def _cuda_extension_kwargs() -> dict:
    if os.environ.get("FASTLM_BUILD_CUDA", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith((".cu", ".cpp"))
    )
    spec = (
        os.environ.get("FASTLM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    )
    archs = spec.replace(",", ";").replace(" ", ";").split(";")
    gencode = []
    for arch in filter(None, archs):
        num = arch.replace(".", "").replace("+PTX", "")
        gencode += [f"-gencode=arch=compute_{num},code=sm_{num}"]
    ext = CUDAExtension(
        name="fastlm._C",
        sources=sources,
        include_dirs=[csrc],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", *gencode],
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extension_kwargs())
