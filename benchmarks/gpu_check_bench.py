"""Stage "bench" of benchmarks/gpu_check.sh: the headline benchmarks in one small fixed grid.

Each bench_*.py script contributes its ``headline(res, device, timer, dry, budget)`` rows
(attention, LayerNorm, linear+GELU, decode, models): every row next to its baselines
measured in the same process (SDPA flash/cuDNN/efficient, torch, cuBLAS, transformers),
medians of triton.testing.do_bench (CUDA events). Autotuning stays on; torch.compile
baselines stay out (minutes of compiles per shape). Sections run in order of value, each
within its share of the wall-clock budget (a headline() asks ``budget()`` before each
shape); a section with no time left is recorded as skipped, and one that raises is recorded
as failed while the rest go on. The rows are rewritten to ``--out``
after every section, so a kill keeps what finished.

``--dry-run``: the same sections on tiny shapes on the CPU, each call timed once
(harness.run_once_ms) through the interpreter: it proves the code runs, never a speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback

import torch

from benchmarks.harness import Results, environment, run_once_ms

# (section, module with headline(), share of the time budget) in order of value. A section
# gets its share of the time left, so one that finishes early leaves more to the rest, and
# attention's autotuning cannot starve the others.
SECTIONS = [
    ("attention", "benchmarks.bench_attention", 40),
    ("decode", "benchmarks.bench_decode", 10),
    ("layer_norm", "benchmarks.bench_layer_norm", 8),
    ("linear_gelu", "benchmarks.bench_ffn", 17),
    ("models", "benchmarks.bench_models", 25),
    ("families", "benchmarks.bench_families", 20),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file: environment, rows, sections")
    p.add_argument("--budget-s", type=float, default=160.0, help="stop starting work after this")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no timings")
    args = p.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        import fastlm

        fastlm.set_backend(None)  # automatic: triton is asked for explicitly per row
    deadline = time.monotonic() + args.budget_s
    timer = run_once_ms if dry else None
    sections, failed = [], 0
    shares_left = sum(share for *_, share in SECTIONS)
    for name, module, share in SECTIONS:
        res = Results(f"gpu_check_{name}")
        start = time.perf_counter()
        now = time.monotonic()
        mine = now + (deadline - now) * share / shares_left
        shares_left -= share
        budget = lambda mine=mine: time.monotonic() < mine
        if not budget():
            status, detail = "skipped", f"time budget of {args.budget_s:.0f} s used up"
        else:
            print(f"== {name}", flush=True)
            try:
                importlib.import_module(module).headline(res, device, timer, dry, budget)
                status, detail = "passed", f"{len(res.rows)} rows"
            except Exception as exc:
                traceback.print_exc()
                status, detail = "failed", f"{type(exc).__name__}: {exc}"[:500]
                failed += 1
            if not dry:
                torch.cuda.empty_cache()
        for row in res.rows:
            row.update(section=name, dry_run=dry)
        sections.append(
            dict(stage="bench", check=name, status=status, detail=detail, rows=res.rows,
                 seconds=round(time.perf_counter() - start, 1))
        )  # fmt: skip
        print(f"CHECK bench {name}: {status.upper()} {detail}", flush=True)
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "sections": sections}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
