"""``python -m fastlm check``: every op on this machine's device against the reference.

For each op, backend and dtype: random inputs, forward and (where the op is differentiable)
backward, each output and gradient judged by the parity rule of fastlm/parity.py against the
fp64 reference, with PyTorch in the input dtype as the baseline.
"""

from __future__ import annotations

import importlib

import torch

from fastlm import backends
from fastlm.parity import judge
from fastlm.selfcheck_ops import CHECKS, Args, Check


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _leaf(v, dtype=None):
    if not isinstance(v, torch.Tensor):
        return v
    t = v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach().clone()
    if v.is_floating_point() and v.requires_grad:
        t.requires_grad_()
    return t


def _forward_backward(fn, args: Args, grad_args, cotangent_seed: int):
    outs = _as_tuple(fn(**args))
    grads: tuple[torch.Tensor, ...] = ()
    leaves = [args[k] for k in grad_args if isinstance(args.get(k), torch.Tensor)]
    if leaves:
        gen = torch.Generator().manual_seed(cotangent_seed)
        loss = sum(
            (
                o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
            ).sum()
            for o in outs
        )
        grads = torch.autograd.grad(loss, leaves)
    return outs, grads


def run_check(check: Check, backend: str, dtype: torch.dtype, device: torch.device):
    """Yields (name, Verdict) for each output and gradient."""
    torch.manual_seed(0)
    base_args = check.make(dtype, device)
    for k in check.grad_args:
        if isinstance(base_args.get(k), torch.Tensor):
            base_args[k].requires_grad_()
    grad_args = check.grad_args if check.differentiable else ()
    fast = {k: _leaf(v) for k, v in base_args.items()}
    outs, grads = _forward_backward(lambda **a: check.run(backend, **a), fast, grad_args, 1)
    hi = {k: _leaf(v, torch.float64) for k, v in base_args.items()}
    o_outs, o_grads = _forward_backward(check.oracle, hi, grad_args, 1)
    lo = {k: _leaf(v) for k, v in base_args.items()}
    b_outs, b_grads = _forward_backward(check.lowp, lo, grad_args, 1)
    names = [f"out{i}" if len(outs) > 1 else "out" for i in range(len(outs))]
    names += [f"d{k}" for k in grad_args if isinstance(base_args.get(k), torch.Tensor)]
    for name, a, o, b in zip(names, (*outs, *grads), (*o_outs, *o_grads), (*b_outs, *b_grads)):
        yield name, judge(a, o, b)


def _row(op: str, backend: str, dtype: str, result: str, text: str) -> None:
    print(f"{op:<24}{backend:<11}{dtype:<10}{result:<7}{text}")


def _results(check: Check, device: torch.device):
    """(backend, dtype, result, text) rows of one op's table: result is "pass", "FAIL",
    "ERROR" or "skip", and text the worst verdict, the error or why the row was skipped."""
    try:
        importlib.import_module(check.module)
    except ModuleNotFoundError:
        yield "-", "-", "skip", "op not built yet"
        return
    for backend in backends.BACKENDS:
        if (reason := backends.device_reason(backend, device)) is not None:
            yield backend, "-", "skip", reason
            continue
        for dtype in check.dtypes:
            dname = str(dtype).replace("torch.", "")
            if dtype == torch.bfloat16 and device.type == "cpu" and backend == "triton":
                yield backend, dname, "skip", "bf16 is wrong under the Triton interpreter"
                continue
            try:
                verdicts = list(run_check(check, backend, dtype, device))
            except Exception as exc:  # report, keep checking the rest
                yield backend, dname, "ERROR", f"{type(exc).__name__}: {exc}"
                continue
            bad = [(n, v) for n, v in verdicts if not v.ok]
            worst = max(verdicts, key=lambda nv: nv[1].err / max(nv[1].bound, 1e-30))
            name, verdict = bad[0] if bad else worst
            yield backend, dname, "FAIL" if bad else "pass", f"{name}: {verdict.detail}"


def main(device: torch.device | None = None, ops: list[str] | None = None) -> int:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(ops or ()) - {c.op for c in CHECKS}
    if unknown:
        print(f"unknown op(s) {sorted(unknown)}; known: {[c.op for c in CHECKS]}")
        return 2
    print(
        f"fastlm check on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})"
    )
    _row("op", "backend", "dtype", "result", "worst")
    counts = {"pass": 0, "FAIL": 0, "ERROR": 0, "skip": 0}
    for check in CHECKS:
        if ops and check.op not in ops:
            continue
        for backend, dtype, result, text in _results(check, device):
            counts[result] += 1
            _row(check.op, backend, dtype, result, text)
    # Counted in rows of the table: a skipped backend is one row whatever its dtypes.
    failed = counts["FAIL"] + counts["ERROR"]
    print(f"{counts['pass']} passed, {failed} failed, {counts['skip']} skipped", end="")
    print(" (each skip row above says why)" if counts["skip"] else "")
    return 1 if failed else 0
