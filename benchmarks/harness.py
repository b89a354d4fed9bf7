"""Shared benchmark runner.

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between runs),
median of many runs. Every row carries the GPU name, torch/triton versions, the fastlm
git sha, dtype and shape, so a result file stands on its own. Ratios are always against a
baseline measured in the same process.

Usage in a bench script::

    res = Results("layer_norm")
    ms = bench(lambda: op(x))
    res.add(op="layer_norm", impl="fastlm-triton", dtype=x.dtype, shape=dict(M=m, N=n),
            pass_="fwd", ms=ms, gbps=bytes_moved / ms * 1e-6)
    res.save()   # benchmarks/results/<gpu>/layer_norm.{json,md,png}
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def require_gpu(script: str) -> None:
    """Benchmarks measure GPU kernels: on a CPU-only machine say so and exit cleanly."""
    if not torch.cuda.is_available():
        print(f"{script}: a CUDA GPU is needed to benchmark; none found, nothing measured.")
        sys.exit(0)


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few shapes only (smoke run)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>)")
    return p.parse_args(argv)


def bench(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` (CUDA events, L2 flushed between repeats)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def bench_or_none(fn: Callable[[], Any], *, timer: Callable[..., float] | None = None, **kw):
    """Like bench (or ``timer``), but a baseline that cannot run this shape (unsupported,
    OOM) gives None."""
    try:
        return (timer or bench)(fn, **kw)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        print(f"  (skipped: {str(exc).splitlines()[0][:120]})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def fastlm_backends(call: Callable[[str], Any]) -> list[str]:
    """The fastlm backends (of triton, cuda) that run ``call(backend)`` on this machine: a
    trial call, so no private dispatch API is needed (cuda needs the built extension and a
    call within its kernels' limits)."""
    import fastlm

    names = []
    for backend in ("triton", "cuda"):
        try:
            call(backend)
        except (
            fastlm.BackendUnavailableError,
            NotImplementedError,
            ValueError,
            RuntimeError,
        ) as exc:
            print(f"  (fastlm-{backend} skipped: {str(exc).splitlines()[0][:120]})")
            continue
        names.append(backend)
    return names


def run_once_ms(fn: Callable[[], Any], **_: Any) -> float:
    """The CPU dry run's stand-in for ``bench``: one call, wall-clock milliseconds. It proves
    that the code path runs, never a speed (the interpreter pays ~1 ms per program)."""
    import time

    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@functools.cache
def git_sha() -> str:
    """The fastlm commit (+ "-dirty"); $FASTLM_GIT_SHA where the tree travels without .git."""
    if os.environ.get("FASTLM_GIT_SHA"):
        return os.environ["FASTLM_GIT_SHA"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


@functools.cache
def environment() -> dict[str, str]:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "fastlm_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def gpu_slug() -> str:
    name = environment()["gpu"].lower()
    name = re.sub(r"^nvidia\s+", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def _plain(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, float):
        return round(v, 6)
    return v


class Results:
    """Rows of one benchmark run; saved as JSON (raw), a markdown table and a plot."""

    def __init__(self, name: str, out_dir: str | None = None):
        self.name = name
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> dict[str, Any]:
        row = {k.rstrip("_"): _plain(v) for k, v in row.items()}
        if isinstance(row.get("shape"), dict):
            row["shape"] = {k: _plain(v) for k, v in row["shape"].items()}
        self.rows.append(row)
        metrics = {k: v for k, v in row.items() if k not in ("shape",)}
        print("  " + "  ".join(f"{k}={v}" for k, v in metrics.items()), flush=True)
        return row

    def folder(self) -> str:
        folder = self.out_dir or os.path.join(RESULTS_DIR, gpu_slug())
        os.makedirs(folder, exist_ok=True)
        return folder

    def save(
        self, *, table_cols: list[str] | None = None, plot: Callable[[str], None] | None = None
    ) -> str:
        folder = self.folder()
        base = os.path.join(folder, self.name)
        with open(base + ".json", "w") as f:
            json.dump({"environment": environment(), "rows": self.rows}, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(self.markdown(table_cols))
        if plot is not None:
            try:
                plot(base + ".png")
            except Exception as exc:  # plotting is a convenience, never a failure
                print(f"  (plot skipped: {exc})")
        print(f"wrote {base}.json and .md")
        return base

    def markdown(self, cols: list[str] | None = None) -> str:
        env = environment()
        head = (
            f"# {self.name}\n\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda']}, fastlm {env['fastlm_sha']}, {env['date']}\n\n"
        )
        if not self.rows:
            return head + "(no rows)\n"
        if cols is None:
            cols = []
            for r in self.rows:
                cols += [k for k in r if k not in cols]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = []
            for c in cols:
                v = r.get(c, "")
                if isinstance(v, dict):
                    v = " ".join(f"{k}={x}" for k, x in v.items())
                elif isinstance(v, float):
                    v = f"{v:.4g}"
                cells.append(str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return head + "\n".join(lines) + "\n"


def line_plot(rows: list[dict], x: str, y: str, series: str, title: str) -> Callable[[str], None]:
    """A plot callback for Results.save: y against x, one line per value of ``series``."""

    def draw(path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in sorted({r[series] for r in rows if y in r and r[y] is not None}, key=str):
            pts = sorted(
                (r["shape"][x] if x in r.get("shape", {}) else r[x], r[y])
                for r in rows
                if r[series] == key and r.get(y) is not None
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(key))
        ax.set_xscale("log", base=2)
        label_axes(ax, x, y, title)
        save_figure(fig, path)

    return draw


def label_axes(ax, xlabel: str, ylabel: str, title: str, legend_size: int = 7) -> None:
    """The labels, title, light grid and legend every benchmark plot carries."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(fig, path: str, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
