"""The GPT-2 decode step replayed from a CUDA graph.

A decode step launches a few dozen small kernels per layer; at batch 1 on a GPU their
launch cost (and the Python that issues them) dominates the step. A CUDA graph records the
step once and replays every launch with one call. That is sound here because the step has
a fixed shape and reads nothing on the host (:meth:`GPT2LMHeadModel.decode_step`): every
tensor it touches lives at a fixed address (the static KV cache, the input ids buffer, the
graph's private activation pool) and its only variable state, ``cache.seqlens``, is on the
device.

Protocol (the one torch.cuda.graphs documents): the first call runs the step eagerly on a
side stream, which is the real first step and also the warm-up (Triton compiles and
autotunes, cuBLAS allocates its workspace); then the step is captured once with a static
ids buffer, and every later call copies its ids in and replays.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastlm.models.kv_cache import StaticKVCache

DecodeStep = Callable[[torch.Tensor], torch.Tensor]


def decode_step(model, cache: StaticKVCache, use_cuda_graph: bool) -> DecodeStep:
    """(B,) next ids -> (B, V) logits, advancing ``cache``: graph-replayed when
    ``use_cuda_graph`` and the cache is on CUDA, eager otherwise (CPU ignores the flag)."""

    def eager(ids: torch.Tensor) -> torch.Tensor:
        return model.decode_step(ids[:, None], cache)

    if use_cuda_graph and cache.k.is_cuda:
        return GraphedDecodeStep(eager, cache)
    return eager


class GraphedDecodeStep:
    """A decode step captured after its first (eager, warm-up) call and replayed after.

    The logits it returns live in the graph's output buffer: they are valid until the next
    call, which overwrites them.
    """

    def __init__(self, step: DecodeStep, cache: StaticKVCache):
        self.step = step
        self.cache = cache
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self._warm_up_and_capture(ids)
        self.cache.check_room(1, "GPT2LMHeadModel.generate")
        self.ids.copy_(ids)
        self.graph.replay()
        # Replay advances the device lengths; the host-side bound follows by hand.
        self.cache.max_filled += 1
        return self.logits

    def _warm_up_and_capture(self, ids: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            logits = self.step(ids)  # the real first step
        torch.cuda.current_stream(ids.device).wait_stream(side)

        self.ids = ids.clone()
        filled = self.cache.max_filled
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.step(self.ids)  # recorded, not run
        # Capture ran the step's Python, host bookkeeping included, but no kernel.
        self.cache.max_filled = filled
        self.graph = graph
        return logits
