"""Subprocess of tests/kernels/sm90_compile.py: compile recorded launches for sm_90.

Reads {"launches": [...], "all_configs": bool, "jobs": int} on stdin; prints one JSON list
of results. Runs without TRITON_INTERPRET so each autotuner holds its GPU configs."""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor


class _FakeTensor:
    """Enough of a tensor for early_config_prune hooks (they read dtypes)."""

    def __init__(self, sig: str):
        import torch

        names = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32}
        self.dtype = names.get(sig, torch.float32)


def _variants(launch: dict, all_configs: bool) -> list[tuple[dict, int, int, str, bool]]:
    """(constexprs, num_warps, num_stages, label, kept) for the GPU configs of a launch:
    every config (``all_configs``) or only the first one the prune hook keeps; ``kept``
    says whether the early_config_prune hook keeps it."""
    import triton

    mod = importlib.import_module(launch["module"])
    obj = getattr(mod, launch["kernel"])
    if not isinstance(obj, triton.runtime.autotuner.Autotuner):
        return [(launch["constexprs"], launch["num_warps"], launch["num_stages"], "launch", True)]
    configs = list(obj.configs)
    kept = configs
    prune = getattr(obj, "early_config_prune", None)
    if prune is not None:
        named = {
            k: (_FakeTensor(t) if t.startswith("*") else None)
            for k, t in launch["signature"].items()
        }
        named.update(launch["constexprs"])
        kept = prune(configs, named)
    if not all_configs:
        configs = kept[:1]
    out = []
    for c in configs:
        const = {**launch["constexprs"], **c.kwargs}
        label = (
            ",".join(f"{k}={v}" for k, v in c.kwargs.items()) + f",w{c.num_warps},s{c.num_stages}"
        )
        out.append((const, c.num_warps, c.num_stages, label, c in kept))
    return out


def _resources(cubin: bytes) -> dict:
    """Registers per thread and local-memory (spill) bytes, read with the cuobjdump that
    ships inside triton; empty when it is not there."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": (int(stack.group(1)) if stack else 0)
        + (int(local.group(1)) if local else 0),
    }


def _compile_one(job: tuple[dict, dict, int, int, str]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch, const, warps, stages, label, kept = job
    mod = importlib.import_module(launch["module"])
    fn = getattr(mod, launch["kernel"])
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    result = {"kernel": launch["kernel"], "config": label, "kept": kept, "signature": launch["signature"],
              "constexprs": {k: v for k, v in const.items()}}  # fmt: skip
    try:
        attrs = {
            (fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch.get("div16", [])
        }
        src = ASTSource(fn=fn, signature=launch["signature"], constexprs=const, attrs=attrs)
        ck = triton.compile(
            src,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        result.update(ok=True, shared=int(ck.metadata.shared), **_resources(ck.asm["cubin"]))
        # Hopper's warpgroup MMA (the fast path for 16-bit dots) vs the older mma.sync.
        result["wgmma"] = "wgmma.mma_async" in ck.asm["ptx"]
    except Exception as exc:  # reported, judged by the test
        result.update(
            ok=False, error=f"{type(exc).__name__}: {exc}"[:2000], tb=traceback.format_exc()[-1500:]
        )
    return result


def main() -> None:
    request = json.load(sys.stdin)
    jobs = []
    for launch in request["launches"]:
        every = request["all_configs"] and launch.get("all_configs", True)
        for variant in _variants(launch, every):
            jobs.append((launch, *variant))
    with ProcessPoolExecutor(max_workers=request.get("jobs", 2)) as pool:
        results = list(pool.map(_compile_one, jobs))
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
