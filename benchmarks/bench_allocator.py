"""What glibc's handling of large temporaries costs a CPU forward, stock and fastlm alike.

glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh
mmap and gives memory at the top of its heap back to the kernel past its trim threshold.
Either way the next large tensor lands on pages the kernel must fault in and zero again:
an encoder forward at batch 32 allocates and frees hundreds of MiB of activations, and
every page of them is faulted in anew on each call. Runtimes that plan their own memory
(OpenVINO) pay none of it. Raising both thresholds keeps freed memory in the heap for the
next call: the same effect a user gets from jemalloc or tcmalloc.

The setting is per process (glibc reads ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` at start-up), so each setting runs in its own processes, the
two alternated ``--processes`` times so that drift hits both; each process times stock
transformers (sdpa) and ``fastlm.optimize`` round-robin and counts the minor page faults
of one call of each.

    python -m benchmarks.bench_allocator                      # MiniLM 32x128, 8x512, 8x32
    python -m benchmarks.bench_allocator --shapes 32x128 --processes 6

Results go to benchmarks/results/cpu/allocator.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch

from benchmarks.harness import Results

KEEP = str(1 << 30)  # 1 GiB: no tensor of these workloads is mmapped, no heap is trimmed
SETTINGS = {
    "glibc default": {},
    "thresholds 1 GiB": {"MALLOC_MMAP_THRESHOLD_": KEEP, "MALLOC_TRIM_THRESHOLD_": KEEP},
}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(batch: int, seq: int, repeats: int) -> dict:
    """In this process: median ms and minor faults of one forward, stock and optimize()."""
    import copy
    import time

    import fastlm
    from benchmarks.bench_workloads import encoder, padded_batch

    stock, vocab = encoder("minilm", torch.float32)
    models = {"stock": stock, "fastlm.optimize": fastlm.optimize(copy.deepcopy(stock))}
    ids, mask = padded_batch(vocab, batch, seq, 0.0)
    times = {name: [] for name in models}
    faults = {}
    with torch.inference_mode():
        for model in models.values():
            model(input_ids=ids, attention_mask=mask)  # warm-up
        for name, model in models.items():
            before = _faults()
            model(input_ids=ids, attention_mask=mask)
            faults[name] = _faults() - before
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: dict(ms=statistics.median(t), faults=faults[name]) for name, t in times.items()}


def _child(setting: str, batch: int, seq: int, repeats: int) -> dict:
    env = {**os.environ, **SETTINGS[setting]}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if name not in SETTINGS[setting]:
            env.pop(name, None)
    cmd = [sys.executable, "-m", "benchmarks.bench_allocator", "--child", f"{batch}x{seq}",
           "--repeats", str(repeats)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="glibc's large-allocation cost on a CPU forward")
    p.add_argument("--shapes", default="32x128,8x512,8x32", help="MiniLM forward BxS list")
    p.add_argument("--processes", type=int, default=4, help="processes per setting")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per path per process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        batch, seq = (int(v) for v in args.child.split("x"))
        print(json.dumps(measure(batch, seq, args.repeats)))
        return 0
    res = Results("allocator")
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        runs = {setting: [] for setting in SETTINGS}
        for _ in range(args.processes):
            for setting in SETTINGS:
                runs[setting].append(_child(setting, batch, seq, args.repeats))
        base = statistics.median(r["stock"]["ms"] for r in runs["glibc default"])
        for setting, results in runs.items():
            for impl in ("stock", "fastlm.optimize"):
                ms = statistics.median(r[impl]["ms"] for r in results)
                res.add(model="minilm", dtype="fp32", shape=dict(batch=batch, seq=seq),
                        allocator=setting, impl=impl, ms=ms,
                        faults=statistics.median(r[impl]["faults"] for r in results),
                        vs_stock_default=base / ms,
                        process_ms=[r[impl]["ms"] for r in results])  # fmt: skip
        res.save(table_cols=["shape", "allocator", "impl", "ms", "faults", "vs_stock_default"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
