"""The wheel: kernels/ installs as fastlm.kernels (never a top-level `kernels`), csrc/ ships
for the JIT build, dispatch_table.json and the license ship, and the metadata declares what
the code imports (torch only; transformers/safetensors in the ``hf`` extra; no triton, which
a CPU install never runs and torch's CUDA wheels bring in the version they were built with).
Building it needs no torch (setup.py imports torch only for the CUDA build)."""

import ast
import email
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_SOURCES = ("fastlm", "kernels")  # what installs as the fastlm package
NOT_SOURCE = shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__")


@pytest.fixture(scope="module")
def wheel_file(tmp_path_factory):
    """A wheel built from a copy of the repository that has a fastlm/dispatch_table.json (the
    repository may not have one yet)."""
    src = tmp_path_factory.mktemp("src") / "fastlm-src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    table = src / "fastlm" / "dispatch_table.json"
    if not table.exists():
        table.write_text(json.dumps({"order": {"layer_norm": ["triton", "cuda"]}}))
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_BUILD_CUDA"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    (name,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    return out / name


@pytest.fixture(scope="module")
def wheel(wheel_file):
    """(file names, parsed METADATA) of that wheel."""
    with zipfile.ZipFile(wheel_file) as zf:
        names = zf.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return names, email.message_from_bytes(zf.read(meta))


def test_kernels_install_inside_the_package(wheel):
    names, _ = wheel
    assert "fastlm/kernels/layer_norm.py" in names
    assert "fastlm/kernels/_mode.py" in names
    assert not any(n.startswith(("kernels/", "csrc/")) for n in names)


def test_installed_wheel_imports_its_kernels(wheel_file, tmp_path):
    """The wheel unpacked on its own (no checkout, no editable finder) serves fastlm.kernels
    and fastlm.csrc from inside the package."""
    with zipfile.ZipFile(wheel_file) as zf:
        zf.extractall(tmp_path / "site")
    code = (
        "import sys, fastlm, fastlm.kernels.limits, fastlm._cuda_ext as c\n"
        "assert not any(type(f).__name__ == 'SourceTreeFinder' for f in sys.meta_path)\n"
        "print(fastlm.kernels.limits.__file__); print(c.csrc_dir())"
    )
    out = _run_isolated(code, cwd=tmp_path, path=[tmp_path / "site"])
    assert out.returncode == 0, out.stderr[-3000:]
    for line in out.stdout.split():
        assert line.startswith(str(tmp_path / "site" / "fastlm")), out.stdout


def test_source_tree_maps_kernels_without_an_install(tmp_path):
    """A copy of the checkout on PYTHONPATH (as benchmarks/gpu_check.sh runs the repository)
    imports fastlm.kernels and fastlm.csrc from the copy's own folders, whatever an editable
    install of another checkout says."""
    src = tmp_path / "checkout"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    code = (
        "import fastlm.kernels.limits as l, fastlm.csrc as c, fastlm._cuda_ext as x\n"
        "print(l.__file__); print(list(c.__path__)[0]); print(x.csrc_dir())"
    )
    out = _run_isolated(code, cwd=tmp_path, path=[src])
    assert out.returncode == 0, out.stderr[-3000:]
    kernels_file, csrc, csrc_dir = out.stdout.split()
    assert kernels_file == str(src / "kernels" / "limits.py")
    assert csrc == csrc_dir == str(src / "csrc")


def test_source_tree_mapping_is_pyprojects():
    from fastlm import _source_tree

    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert {k: v for k, v in mapping.items() if k != v} == _source_tree.MAPPED


def _run_isolated(code: str, cwd, path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip


def _repo_top_level_names() -> set[str]:
    """What ``import NAME`` could find in the repository root: regular packages (folders with
    ``__init__.py``) and modules."""
    names = set()
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.startswith("."):
            continue
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif entry.endswith(".py"):
            names.add(entry[:-3])
    return names


def test_no_top_level_name_shadows_an_installed_distribution():
    """The repository root is on sys.path whenever anything runs from it (python -m, pytest):
    none of its importable names may hide a module some installed distribution provides."""
    from importlib.metadata import packages_distributions

    provided = packages_distributions()
    own = {"fastlm", "tests", "benchmarks", "setup", "examples"}
    clashes = {
        name: provided[name]
        for name in _repo_top_level_names()
        if name in provided and set(provided[name]) != {"fastlm"}
    }
    assert not clashes, f"repository names that shadow installed packages: {clashes}"
    # A name the repository claims beyond its own must be reviewed here first.
    assert _repo_top_level_names() <= own, _repo_top_level_names() - own


def test_from_the_repository_root_kernels_is_hugging_faces_and_models_load():
    """transformers >= 5.25 imports Hugging Face's ``kernels`` while loading any model; from
    the repository root (sys.path[0]) that name must not resolve into the repository."""
    code = """
import importlib.util, os, sys
spec = importlib.util.find_spec("kernels")
origins = [spec.origin] if spec is not None and spec.origin else []
origins += list(spec.submodule_search_locations or []) if spec is not None else []
own = os.path.join(os.getcwd(), "kernels")
inside = [o for o in origins if os.path.abspath(o) == own or os.path.abspath(o).startswith(own + os.sep)]
regular = spec is not None and spec.origin not in (None, "namespace")
assert not (inside and regular), f"kernels resolves into the repository: {origins}"
try:
    from importlib.metadata import distribution
    distribution("kernels")
    assert not inside, f"Hugging Face's kernels is installed but {origins} is found"
except ImportError:
    pass
import transformers
cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=37, vocab_size=99)
model = transformers.AutoModel.from_config(cfg)
print(type(model).__name__)
"""
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "BertModel"


def test_every_python_module_ships(wheel):
    """The package list in pyproject.toml is explicit (kernels/ and csrc/ are mapped into
    fastlm): every module of the source tree must be in the wheel, so a new op folder
    cannot be left out of it."""
    names = set(wheel[0])
    missing = []
    for src, dest in (("fastlm", "fastlm"), ("kernels", "fastlm/kernels")):
        for folder, _, files in os.walk(os.path.join(ROOT, src)):
            rel = os.path.relpath(folder, os.path.join(ROOT, src))
            for f in files:
                if f.endswith(".py"):
                    path = os.path.normpath(os.path.join(dest, rel, f)).replace(os.sep, "/")
                    if path not in names:
                        missing.append(path)
    assert not missing, (
        f"modules missing from the wheel (add their package to pyproject.toml): {missing}"
    )


def test_csrc_ships_for_the_jit_build(wheel):
    cu = [n for n in wheel[0] if n.startswith("fastlm/csrc/") and n.endswith(".cu")]
    assert cu, "no CUDA sources in the wheel"


def test_dispatch_table_and_license_ship(wheel):
    names, meta = wheel
    assert "fastlm/dispatch_table.json" in names
    assert any(n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n for n in names)
    assert "Apache-2.0" in (meta.get("License-Expression") or meta.get("License") or "")


def test_no_tests_or_benchmarks_in_the_wheel(wheel):
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in wheel[0])


def _requirements(meta) -> dict[str, set[str]]:
    """{extra or "": {distribution names}} from Requires-Dist lines."""
    out: dict[str, set[str]] = {}
    for line in meta.get_all("Requires-Dist") or []:
        req, _, marker = line.partition(";")
        name = req.split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
        extra = marker.split("extra ==")[1].strip().strip("'\"") if "extra ==" in marker else ""
        out.setdefault(extra, set()).add(name)
    return out


def test_metadata_dependencies(wheel):
    reqs = _requirements(wheel[1])
    assert reqs[""] == {"torch"}  # no triton, no numpy for a CPU-only install
    assert reqs["hf"] == {"transformers", "safetensors"}
    assert "triton" in reqs["test"]  # CI runs the kernels through the interpreter


def _third_party_imports() -> set[str]:
    """Top-level names of every non-stdlib module imported anywhere in the package sources."""
    names = set()
    for top in PACKAGE_SOURCES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                with open(os.path.join(dirpath, f)) as source:
                    tree = ast.parse(source.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(a.name.split(".")[0] for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"fastlm"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_import_is_declared():
    project = _pyproject()["project"]
    declared = {
        d.split("[")[0].split(">")[0].split("=")[0].strip() for d in project["dependencies"]
    }
    for extra in project["optional-dependencies"].values():
        declared |= {d.split("[")[0].split(">")[0].split("=")[0].strip() for d in extra}
    declared = {d.replace("-", "_") for d in declared}
    assert _third_party_imports() <= declared, _third_party_imports() - declared


def test_build_requirements_have_wheel():
    requires = _pyproject()["build-system"]["requires"]
    assert "wheel" in requires  # `pip wheel --no-build-isolation` needs it


def test_plain_build_does_not_import_torch():
    code = "import sys, runpy; sys.argv=['setup.py','--name']; runpy.run_path('setup.py'); print('torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_BUILD_CUDA"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"


def _run_without(blocked: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import <blocked>`` fails, as on an install
    without that package."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLM_BACKEND")}
    prelude = f"import sys; sys.modules[{blocked!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip


def test_cpu_install_runs_every_op_without_triton():
    code = """
import torch
import fastlm
from fastlm import backends
assert 'not importable' in backends.device_reason('triton', torch.device('cpu'))
x, w = torch.randn(4, 32), torch.randn(32)
fastlm.layer_norm(x, w, w, 1e-5)
w1, w2 = torch.randn(64, 32), torch.randn(32, 64)
fastlm.linear_gelu(x, w1, None)
fastlm.gelu_ffn(x, w1, None, w2, None)
q = torch.randn(2, 5, 2, 16)
fastlm.attention(q, q, q, causal=True)
cu = torch.tensor([0, 3, 10], dtype=torch.int32)
fastlm.attention_varlen(q.flatten(0, 1), q.flatten(0, 1), q.flatten(0, 1), cu, cu, 7, 7)
cache = torch.zeros(2, 8, 2, 16)
fastlm.attention_with_kvcache(q[:, :1], cache, cache.clone(), torch.tensor([3, 0], dtype=torch.int32))
import fastlm.__main__ as cli
assert cli.main(['info']) == 0
print('ok')
"""
    out = _run_without("triton", code)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_without_transformers_the_hf_features_say_what_to_install():
    code = """
import fastlm.__main__ as cli
assert cli.main(['demo']) == 1
try:
    fastlm_optimize = __import__('fastlm').optimize
except ModuleNotFoundError as exc:
    print('optimize:', exc)
"""
    out = _run_without("transformers", code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "`fastlm demo` (it runs the models next to transformers) needs the transformers package"
        in out.stdout
    )
    assert "optimize: fastlm.optimize needs the transformers package" in out.stdout
    assert "pip install 'fastlm[hf]'" in out.stdout
