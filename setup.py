"""Build script: only the optional CUDA extension lives here.

A plain ``pip install .`` is pure Python (metadata is in pyproject.toml) and never imports
torch. ``FASTLM_BUILD_CUDA=1 pip install --no-build-isolation .`` also compiles csrc/ into
``fastlm._C`` with torch's CUDAExtension (ninja; ``MAX_JOBS`` and ``FASTLM_CUDA_ARCHS``
honoured). torch is imported only on that path, so it never becomes a build requirement.
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
    archs = os.environ.get("FASTLM_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = []
    for arch in filter(None, archs):
        num = arch.replace(".", "")
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
