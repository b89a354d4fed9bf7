"""Per-call cost of each public op on tiny inputs, against the PyTorch call that does the
same work, in the same process: what a model pays per op beyond the arithmetic.

On tiny inputs the kernel is nearly free, so the time is validation, backend choice,
dispatch and launch. On a CPU both sides run PyTorch's kernels (fastlm's default backend
there is PyTorch's own composite ops), so the ratio is fastlm's overhead; on a GPU it is
the launch-bound decode regime, where per-call overhead caps throughput.

Timing: torch.utils.benchmark's blocked_autorange (median over blocks of calls; CUDA
synchronized), inference mode, a warm-up call first. Rows: op, impl ("fastlm" with the
automatic backend, or "torch"), us per call, and fastlm's ratio to torch.

    python -m benchmarks.bench_overhead            # -> benchmarks/results/<device>/overhead.*
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fastlm
from benchmarks.harness import Results, parse_args
from fastlm.bench import median_ms


def cases(device: torch.device, dtype: torch.dtype):
    """(op, fastlm call, PyTorch call) on tiny inputs: one token row of a small model."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, w, b = randn(4, 64), randn(64), randn(64)
    w1, b1, w2, b2 = randn(128, 64), randn(128), randn(64, 128), randn(64)
    q = randn(1, 8, 2, 32)  # (B, S, H, D)
    qt = q.transpose(1, 2)  # SDPA's (B, H, S, D), a view
    kc, vc = randn(1, 64, 2, 32), randn(1, 64, 2, 32)
    lens = torch.tensor([40], dtype=torch.int32, device=device)
    q1 = randn(1, 1, 2, 32)
    keep = (torch.arange(64, device=device) < 40)[None]  # (1, S_max): the valid prefix

    def torch_decode():
        k, v = kc.transpose(1, 2), vc.transpose(1, 2)
        return F.scaled_dot_product_attention(q1.transpose(1, 2), k, v, attn_mask=keep)

    return [
        ("layer_norm", lambda: fastlm.layer_norm(x, w, b), lambda: F.layer_norm(x, (64,), w, b)),
        ("layer_norm+residual",
         lambda: fastlm.layer_norm(x, w, b, residual=x),
         lambda: (F.layer_norm(x + x, (64,), w, b), x + x)),
        ("linear_gelu", lambda: fastlm.linear_gelu(x, w1, b1), lambda: F.gelu(F.linear(x, w1, b1))),
        ("gelu_ffn",
         lambda: fastlm.gelu_ffn(x, w1, b1, w2, b2, residual=x),
         lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) + x),
        ("attention",
         lambda: fastlm.attention(q, q, q, causal=True),
         lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True)),
        ("attention_with_kvcache",
         lambda: fastlm.attention_with_kvcache(q1, kc, vc, lens),
         torch_decode),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    min_run_time = 0.05 if args.quick else 0.5
    res = Results("overhead", args.out)
    with torch.inference_mode():
        for op, ours, theirs in cases(device, dtype):
            t_ours = median_ms(ours, min_run_time) * 1e3
            t_theirs = median_ms(theirs, min_run_time) * 1e3
            res.add(op=op, impl="torch", dtype=dtype, us=t_theirs)
            res.add(op=op, impl="fastlm", dtype=dtype, us=t_ours, ratio_vs_torch=t_ours / t_theirs)
    res.save(table_cols=["op", "impl", "dtype", "us", "ratio_vs_torch"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
