"""Compile the Triton kernels for sm_90 (H100) on a machine without a GPU.

The interpreter proves a kernel's arithmetic; it never runs Triton's GPU compiler, so a
kernel can pass every CPU test and still fail to compile for the GPU (layout or dtype rules
of tl.dot, bf16 paths, shared memory overflow of an autotune config). This module records
the real launches the launchers make (under the interpreter) and compiles each one for
``GPUTarget("cuda", 90, 32)`` with every GPU autotune config, in a subprocess without
TRITON_INTERPRET (so the autotuners hold their GPU configs).

Stage 1, ``record(fn)``: runs ``fn`` under the interpreter and returns the launches.
Stage 2, ``compile_launches(launches)``: the subprocess; returns one result per
(launch, config): shared memory bytes or the compile error.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch

_PTR = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.bool: "*i1",
}
H100_MAX_SMEM = 232448  # bytes of shared memory one block may opt in to on sm_90


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {value!r}")


def record(fn: Callable[[], object]) -> list[dict]:
    """Launches made while ``fn`` runs under the interpreter: kernel, signature, constexprs."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    original = InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        params = self.fn.__code__.co_varnames[: self.fn.__code__.co_argcount]
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        constexpr = {
            name
            for name, p in inspect.signature(self.fn).parameters.items()
            if p.annotation is tl.constexpr or str(p.annotation).endswith("constexpr")
        }
        sig, const, div16 = {}, {}, []
        for name in params:
            value = bound.get(name)
            if name in constexpr:
                sig[name] = "constexpr"
                const[name] = value
            elif isinstance(value, int) and not isinstance(value, bool) and value == 1:
                # The JIT turns an int argument equal to 1 into a constant (unit strides:
                # contiguity the compiler can use for vector loads and pipelining).
                sig[name] = "constexpr"
                const[name] = 1
            else:
                sig[name] = _arg_type(value)
                # Triton's JIT specializes 16-byte aligned pointers and ints divisible by 16
                # (vector loads, cheaper address math): compile with the same facts.
                if (isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0) or (
                    isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0
                ):
                    div16.append(name)
        launches.append(
            {
                "module": self.fn.__module__,
                "kernel": self.fn.__name__,
                "signature": sig,
                "constexprs": const,
                "div16": div16,
                "num_warps": kwargs.get("num_warps", 4),
                "num_stages": kwargs.get("num_stages", 3),
            }
        )
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = spy
    try:
        fn()
    finally:
        InterpretedFunction.run = original
    return launches


def unique(launches: list[dict]) -> list[dict]:
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def compile_launches(
    launches: list[dict], *, all_configs: bool = True, jobs: int = 2
) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    payload = json.dumps(
        {"launches": launches, "all_configs": all_configs, "jobs": jobs}, default=str
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._sm90_compile_worker"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compile worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
