"""Regenerate fastlm/dispatch_table.json from committed benchmark results.

    python -m benchmarks.make_dispatch_table [--gpu NAME] [--write]

Reads benchmarks/results/<gpu>/*.json (written by benchmarks/harness.py: rows with
``op``, ``impl`` and ``ms``). For every op with rows for both ``fastlm-triton`` and
``fastlm-cuda`` on the same configuration (every other non-timing field equal), the
backend with the lower geometric-mean time goes first. Ops without paired measurements
keep the default order (triton, cuda, torch). Prints the table; --write saves it.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TABLE = os.path.join(os.path.dirname(HERE), "fastlm", "dispatch_table.json")
IMPLS = {"fastlm-triton": "triton", "fastlm-cuda": "cuda"}


def _config(row: dict) -> str:
    """What identifies a measurement: every field but the implementation and the measured
    values. Measurements (ms, GB/s, TFLOP/s, ratios to baselines) are floats; identifying
    fields (op, pass, dtype, shape, flags, integer sizes) are not."""
    ident = {
        k: v for k, v in row.items() if k != "impl" and not isinstance(v, float) and v is not None
    }
    return json.dumps(ident, sort_keys=True, default=str)


def build(rows: list[dict]) -> dict:
    times: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        backend = IMPLS.get(row.get("impl"))
        ms = row.get("ms")
        if backend is None or not isinstance(ms, (int, float)) or ms <= 0 or "op" not in row:
            continue
        times.setdefault(row["op"], {}).setdefault(_config(row), {})[backend] = float(ms)
    order, ratio = {}, {}
    for op, configs in sorted(times.items()):
        logs = [math.log(t["cuda"] / t["triton"]) for t in configs.values() if len(t) == 2]
        if not logs:
            continue
        geo = math.exp(sum(logs) / len(logs))
        ratio[op] = round(geo, 4)
        order[op] = ["cuda", "triton", "torch"] if geo < 1.0 else ["triton", "cuda", "torch"]
    return {"order": order, "cuda_over_triton_geomean_time": ratio}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", help="results subfolder (default: every folder)")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--write", action="store_true", help=f"write {TABLE}")
    p.add_argument("--out", default=TABLE)
    args = p.parse_args(argv)
    pattern = os.path.join(args.results, args.gpu or "*", "*.json")
    files = sorted(glob.glob(pattern))
    rows = []
    for path in files:
        with open(path) as f:
            rows += json.load(f).get("rows", [])
    table = build(rows)
    table["sources"] = [os.path.relpath(f, args.results) for f in files]
    print(json.dumps(table, indent=1))
    if args.write:
        if not table["order"]:
            raise SystemExit(
                f"no paired fastlm-triton/fastlm-cuda timings under {pattern}; not writing"
            )
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
