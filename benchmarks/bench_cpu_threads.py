"""The evidence behind fastlm.cpu_threads: what a busy neighbour costs a CPU forward at each
thread count, what the governor's signal reads, and whether it ever takes a thread from a
quiet machine.

For each MiniLM shape, quiet and with a busy neighbour (another process spinning on one
core), ``--repeats`` rounds of:

* stock transformers (sdpa) at the user's thread count and at one thread fewer (the
  governor off: plain PyTorch), medians in ms;
* ``fastlm.optimize`` with the governor on (the default), and per layer the utilization
  the governor reads (process CPU time over threads x wall time), and how many forwards
  ran with a thread taken.

    python -m benchmarks.bench_cpu_threads                    # MiniLM 1x16, 8x32, 32x128
    python -m benchmarks.bench_cpu_threads --shapes 8x32 --repeats 15

Results go to benchmarks/results/cpu/cpu_threads.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fastlm.cpu_threads as governor_module
from benchmarks.bench_workloads import encoder, neighbour, padded_batch
from benchmarks.harness import Results


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _utilizations(governor) -> list[float]:
    """Record the utilization of every judged layer (a wrapper of governor.observe)."""
    seen: list[float] = []
    observe = governor.observe

    def spy(n, threads, wall_s, cpu_s):
        if threads == n and wall_s >= governor_module.MIN_WALL_S:
            seen.append(cpu_s / (wall_s * n))
        observe(n, threads, wall_s, cpu_s)

    governor.observe = spy
    return seen


def cell(res: Results, stock, fast, vocab: int, shape: tuple[int, int], kind: str,
         repeats: int) -> None:  # fmt: skip
    batch, seq = shape
    ids, mask = padded_batch(vocab, batch, seq, 0.0)
    users = torch.get_num_threads()

    def forward(model):
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    times = {"stock": [], "stock, one thread fewer": [], "fastlm": []}
    governor = governor_module.GOVERNOR
    governor.reset()
    utilizations = _utilizations(governor)
    taken = 0
    with neighbour(kind):
        for _ in range(repeats):
            for route in times:
                threads = users - 1 if route == "stock, one thread fewer" else users
                torch.set_num_threads(threads)
                model = fast if route == "fastlm" else stock
                forward(model)  # warm-up in this round's state
                times[route].append(_ms(lambda m=model: forward(m)))
                taken += route == "fastlm" and governor.reduced_by > 0
                torch.set_num_threads(users)
    del governor.observe  # back to the class's method
    for route, ms in times.items():
        res.add(
            model="minilm", shape=f"{batch}x{seq}", neighbour=kind, route=route,
            threads=users - 1 if route == "stock, one thread fewer" else users,
            ms=statistics.median(ms),
            vs_stock=statistics.median(times["stock"]) / statistics.median(ms),
            utilization_median=statistics.median(utilizations) if route == "fastlm" else None,
            utilization_min=min(utilizations) if route == "fastlm" else None,
            forwards_with_a_thread_taken=f"{taken}/{repeats}" if route == "fastlm" else None,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x16,8x32,32x128")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if torch.get_num_threads() < 2:
        raise SystemExit("bench_cpu_threads needs at least 2 intra-op threads")
    import fastlm

    stock, vocab = encoder("minilm", torch.float32)
    fast = fastlm.optimize(copy.deepcopy(stock))
    res = Results("cpu_threads", out_dir="benchmarks/results/cpu")
    for text in args.shapes.split(","):
        batch, seq = (int(v) for v in text.split("x"))
        for kind in ("quiet", "busy"):
            cell(res, stock, fast, vocab, (batch, seq), kind, args.repeats)
    res.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
