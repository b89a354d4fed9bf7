"""Run a function on N torch.distributed ranks (gloo, CPU) from inside a pytest test.

The ranks are forked, not spawned: a child inherits the imported torch, transformers and
fastlm instead of importing them again (seconds per rank on a 2-core machine). Each rank
joins the group through a FileStore in the test's own tmp_path, so concurrent tests
(pytest-xdist) never race for a TCP port. Each rank runs one intra-op thread: two ranks
share the machine's cores, and a forked child must not enter an OpenMP pool its parent
started. A rank that raises writes its traceback, which the test's failure shows; a rank
that hangs (a collective one rank never reached) is killed at the deadline and the test
fails, so a bug never blocks CI. No rank outlives the call.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Long enough for the slowest collective of a tiny model on a loaded CI machine; a rank
# whose partner died fails its collective after this instead of waiting forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def run_ranks(fn: Callable[[int, int], Any], workdir: Path, world_size: int = 2,
              timeout: float = 120.0) -> list[Any]:  # fmt: skip
    """``[fn(rank, world_size) for rank in ...]``, each call on its own process in one gloo
    group; the results come back through torch.save files in ``workdir``."""
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, str(workdir)), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [
        f"rank {rank} (exit code {p.exitcode}):\n{_read(workdir / f'rank{rank}.err')}"
        for rank, p in enumerate(procs)
        if p.exitcode != 0 and rank not in hung
    ]
    if hung:
        errors.insert(0, f"ranks {hung} did not finish in {timeout:.0f} s and were killed")
    if errors:
        raise RuntimeError(f"{world_size} ranks:\n" + "\n".join(errors))
    return [
        torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)
    ]


def _rank_main(fn, rank: int, world_size: int, workdir: str) -> None:
    torch.set_num_threads(1)
    out = Path(workdir)
    try:
        store = dist.FileStore(str(out / "store"), world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
        )
        try:
            torch.save(fn(rank, world_size), out / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # not sys.exit: a forked pytest child must not run the parent's exit handlers


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else "(no traceback: killed or crashed)"
