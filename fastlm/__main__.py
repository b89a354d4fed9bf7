"""fastlm command line: ``python -m fastlm info | check | bench | demo``, ``--version``."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

from fastlm import __version__
from fastlm._help_text import plain
from fastlm.selfcheck_ops import CHECKS

OPS = {check.op: check.module for check in CHECKS}  # public op -> the module that defines it


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception:
        return "not installed"


def versions() -> str:
    """fastlm's version, then those of python and the packages it runs on."""
    import torch

    return (
        f"fastlm {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
        f"triton {_version('triton')}  transformers {_version('transformers')}  "
        f"CUDA {torch.version.cuda}"
    )


class _Version(argparse.Action):
    """``--version``: prints :func:`versions` and exits. Unlike argparse's own "version"
    action it imports torch, triton and transformers only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            help="print fastlm's version and those of torch, triton and transformers",
        )

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


def cmd_info(_args) -> int:
    import torch

    from fastlm import backends, dispatch_table

    dev = _device()
    print(versions())
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {dev} — {name}")
    print(
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}  FASTLM_BACKEND={os.environ.get('FASTLM_BACKEND', '')!r}"
    )
    print("\nbackends on this device:")
    reasons = {}
    for b in backends.BACKENDS:
        if b == "cuda" and dev.type == "cuda":
            from fastlm import _cuda_ext

            reasons[b] = _cuda_ext.peek_reason()  # info never starts the JIT build
        else:
            reasons[b] = backends.device_reason(b, dev)
        print(f"  {b:<7} {'available' if reasons[b] is None else 'unavailable: ' + reasons[b]}")
    forced = backends.get_backend()
    print("\nops (automatic choice on this device):")
    for op, module in OPS.items():
        order = dispatch_table.preferred_order(op) if dev.type == "cuda" else ("torch",)
        chosen = forced or next((b for b in order if reasons[b] is None), "torch")
        try:
            importlib.import_module(module)
            present = ""
        except ModuleNotFoundError:
            present = "  (op not built yet)"
        print(f"  {op:<24} -> {chosen:<7} order {'/'.join(order)}{present}")
    if dev.type == "cpu":
        print("\nOn CPU tensors the torch reference serves by default; set TRITON_INTERPRET=1 and")
        print("FASTLM_BACKEND=triton to run the Triton kernels through the interpreter.")
    return 0


def cmd_check(args) -> int:
    from fastlm import selfcheck

    return selfcheck.main(_device(), getattr(args, "ops", None) or None)


def cmd_bench(args) -> int:
    from fastlm import bench

    return bench.main(args.rest)


def cmd_demo(args) -> int:
    from fastlm import demo

    return demo.run_demo(args.rest)


COMMANDS = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "demo": cmd_demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastlm",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, which backend serves which op and why not")
    check = sub.add_parser("check", help="run every op against the reference and print max errors")
    check.add_argument("ops", nargs="*", help="only these ops (default: all)")
    for name, text in (
        ("bench", "time each public op against its PyTorch equivalent (median of repeats)"),
        ("demo", "MiniLM BERT and GPT-2 vs Hugging Face"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("bench", "demo"):
        # Their own parsers read the rest: argparse.REMAINDER would refuse a first argument
        # that starts with "--" ("demo --runs 3").
        return COMMANDS[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return COMMANDS[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
