"""`make bench`: every benchmark script in turn (each exits cleanly without a GPU)."""

from __future__ import annotations

import importlib
import sys

import torch

SCRIPTS = ["bench_layer_norm", "bench_ffn", "bench_attention", "bench_decode", "bench_models"]


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("make bench: a CUDA GPU is needed to benchmark; none found, nothing measured.")
        return 0
    only = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("-")]
    for name in only or SCRIPTS:
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            print(f"== {name}: not present ({exc})")
            continue
        print(f"== {name}", flush=True)
        mod.main(flags)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
