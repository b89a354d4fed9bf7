"""Stage "pack" of benchmarks/gpu_check.sh: summary.md and results.json from the stages' files.

    python -m benchmarks.gpu_check_report probe --state DIR        # versions -> DIR/probe.json
    python -m benchmarks.gpu_check_report pack --state DIR --out OUT

``pack`` runs after every stage (so a kill at any moment leaves a current summary) and reads
what the stages left: DIR/stages.tsv (stage, status, seconds, exit code), DIR/probe.json,
OUT/correctness.log (pytest -v lines, parsed as they stand, so a killed run still lists the
tests that finished and failed), DIR/selection.json (tests per selection line),
DIR/models.jsonl and DIR/bench.json. It writes OUT/results.json (every raw row, stamped with
the GPU, versions and git sha) and OUT/summary.md (each check with pass/fail, each fastlm
benchmark row with its ratio to the best baseline measured in the same process), and trims
the logs in OUT to their tails.
"""

from __future__ import annotations

import argparse
import json
import os
import re

LOG_TAIL_LINES = 4000
# pytest -v result lines, with and without xdist: "[gw0] [ 5%] PASSED tests/x.py::t[a]" and
# "tests/x.py::t[a] PASSED [ 5%]".
_XDIST = re.compile(
    r"\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)"
)
_PLAIN = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _version(module: str) -> str:
    try:
        return getattr(__import__(module), "__version__", "present")
    except ImportError:
        return "absent"


def probe(state: str) -> None:
    """Versions and device, as the Python the checks run with sees them; fails when fastlm
    (with its fastlm.kernels / fastlm.csrc mapping) does not import."""
    import platform

    import torch
    import triton

    import fastlm
    import fastlm.csrc
    import fastlm.kernels
    from benchmarks.harness import git_sha

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "fastlm_sha": git_sha(),
        "fastlm_from": os.path.dirname(fastlm.__file__),
    }
    for module in ("transformers", "pytest", "xdist", "pytest_timeout"):
        info[module] = _version(module)
    with open(os.path.join(state, "probe.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(" ".join(f"{k}={v}" for k, v in info.items()))


def _load(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        try:
            return json.load(f)
        except json.JSONDecodeError:  # a stage killed while writing
            return default


def test_outcomes(log: str) -> dict[str, str]:
    """{node id: outcome} from a pytest -v log (the last word on a test wins)."""
    outcomes: dict[str, str] = {}
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            for line in f:
                m = _XDIST.search(line)
                if m:
                    outcomes[m.group(2)] = m.group(1)
                    continue
                m = _PLAIN.search(line)
                if m:
                    outcomes[m.group(1)] = m.group(2)
    return outcomes


def bench_ratios(rows: list[dict]) -> list[dict]:
    """Each fastlm row with the fastest baseline of its group (same section, op/grid/model,
    dtype, shape and pass) measured in the same process: ratio = baseline ms / fastlm ms."""

    def group(r):
        keys = ("section", "grid", "op", "model", "dtype", "pass")
        return json.dumps([r.get(k) for k in keys] + [r.get("shape")], sort_keys=True)

    best: dict[str, dict] = {}
    for r in rows:
        impl = str(r.get("impl", ""))
        if impl.startswith("fastlm") or r.get("ms") is None or impl == "cublas-gemm":
            continue  # cuBLAS alone is no activation: a speed of light, not a baseline
        g = group(r)
        if g not in best or r["ms"] < best[g]["ms"]:
            best[g] = r
    out = []
    for r in rows:
        if str(r.get("impl", "")).startswith("fastlm") and r.get("ms"):
            base = best.get(group(r))
            out.append({**r, "baseline": base and base["impl"], "baseline_ms": base and base["ms"],
                        "ratio": base and round(base["ms"] / r["ms"], 3)})  # fmt: skip
    return out


def _shape(shape) -> str:
    return " ".join(f"{k}={v}" for k, v in (shape or {}).items())


def _metric(r: dict) -> str:
    for key, unit in (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("tokens_per_s", "tok/s")):
        if r.get(key) is not None:
            extra = (
                f" ({r['pct_peak']:.0f}% of copy bw)" if r.get("pct_peak") and key == "gbps" else ""
            )
            return f"{r[key]:.4g} {unit}{extra}"
    return ""


def summary(env: dict, stages: list[list[str]], tests: dict, selection: dict, models: list,
            bench: dict, dry: bool) -> str:  # fmt: skip
    lines = [f"# fastlm GPU check: {env.get('gpu', '?')}", ""]
    if dry:
        lines += ["**Dry run**: CPU, Triton interpreter, tiny shapes. Timings are single wall-clock"
                  " calls: no speed claim, only proof that every stage runs.", ""]  # fmt: skip
    lines.append(", ".join(f"{k} {env[k]}" for k in
                           ("torch", "triton", "transformers", "cuda", "python", "fastlm_sha") if k in env))  # fmt: skip
    lines += ["", "## Stages", "", "| stage | status | seconds | exit code |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(s)} |" for s in stages]
    counts: dict[str, int] = {}
    for outcome in tests.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    lines += ["", "## Correctness (GPU parity subset, FASTLM_AUTOTUNE=0)", ""]
    lines.append(
        ", ".join(f"{n} {o.lower()}" for o, n in sorted(counts.items())) or "no test finished"
    )
    empty = [k for k, n in selection.items() if not n]
    for line in empty:
        lines.append(f"- **FAILED: selection `{line}` collected no test**")
    lines += ["", "| selection | tests |", "|---|---|"] + [
        f"| `{k}` | {n} |" for k, n in selection.items()
    ]
    failed = sorted(t for t, o in tests.items() if o in ("FAILED", "ERROR"))
    if failed:
        lines += ["", "Failed:", ""] + [f"- `{t}` {tests[t]}" for t in failed]
    lines += ["", "## Models", "", "| check | dtype | status | detail |", "|---|---|---|---|"]
    lines += [f"| {m['check']} | {m['dtype']} | {m['status']} | {m['detail']} |" for m in models]
    lines += ["", "## Benchmarks (ratio = best baseline ms / fastlm ms; > 1: fastlm faster)", ""]
    for sec in bench.get("sections", []):
        lines.append(f"- {sec['check']}: {sec['status']} ({sec['detail']}, {sec['seconds']} s)")
    rows = bench_ratios([r for sec in bench.get("sections", []) for r in sec["rows"]])
    if rows:
        lines += ["", "| section | impl | dtype | shape | pass | ms | baseline (ms) | ratio | rate |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            ratio = "(dry run)" if dry else r["ratio"]
            base = f"{r['baseline']} ({r['baseline_ms']:.4g})" if r["baseline"] else "-"
            lines.append(
                f"| {r['section']} | {r['impl']} | {r.get('dtype', '')} | {_shape(r.get('shape'))} "
                f"| {r.get('pass', '')} | {r['ms']:.4g} | {base} | {ratio} | {'' if dry else _metric(r)} |"
            )
    return "\n".join(lines) + "\n"


def trim_logs(out: str) -> None:
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.endswith(".log") and os.path.isfile(path):
            with open(path, errors="replace") as f:
                tail = f.readlines()[-LOG_TAIL_LINES:]
            with open(path, "w") as f:
                f.writelines(tail)


def pack(state: str, out: str, dry: bool, final: bool) -> None:
    env = _load(os.path.join(state, "probe.json"), {})
    env["dry_run"] = dry
    stages = []
    if os.path.exists(os.path.join(state, "stages.tsv")):
        with open(os.path.join(state, "stages.tsv")) as f:
            stages = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    tests = test_outcomes(os.path.join(out, "correctness.log"))
    selection = _load(os.path.join(state, "selection.json"), {})
    models = _load(os.path.join(state, "models.jsonl"), [])
    bench = _load(os.path.join(state, "bench.json"), {})
    stamp = {k: env.get(k) for k in ("gpu", "torch", "triton", "fastlm_sha")}
    results = {
        "environment": env,
        "stages": [dict(zip(("stage", "status", "seconds", "exit_code"), s)) for s in stages],
        "correctness": {"selection": selection,
                        "tests": [{"test": t, "outcome": o} for t, o in sorted(tests.items())]},
        "models": [{**m, **stamp} for m in models],
        "bench": [{**r, **stamp} for sec in bench.get("sections", []) for r in sec["rows"]],
        "bench_sections": [{k: v for k, v in s.items() if k != "rows"} for s in bench.get("sections", [])],
    }  # fmt: skip
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary(env, stages, tests, selection, models, bench, dry))
    if final:
        trim_logs(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("probe", "pack"))
    p.add_argument("--state", required=True)
    p.add_argument("--out")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--final", action="store_true", help="also trim the logs to their tails")
    args = p.parse_args(argv)
    if args.what == "probe":
        probe(args.state)
    else:
        pack(args.state, args.out, args.dry_run, args.final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
