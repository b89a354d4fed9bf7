"""The compile-time constants of the csrc/ kernels, read from the sources themselves.

The numpy emulation of the kernels' index math (test_fragment_layout.py) must model the
kernels as they are, not as they were when the test was written: block sizes, thread
counts, unroll factors and limits come from here. Parses the file-scope lines

    constexpr int kName = <expression>;          (csrc/*.cu)
    inline constexpr int kName = <expression>;   (csrc/fastlm_limits.h)

where the expression is integer arithmetic over literals and earlier constants, and, for
test_math_constants.py, the math constants

    constexpr float kName = <literal>f;          (csrc/*.cu, or double without the f)
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import re

CSRC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc"
)
_LINE = re.compile(r"^(?:inline\s+)?constexpr\s+int\s+(k\w+)\s*=\s*([^;{]+);", re.M)
_FLOAT_LINE = re.compile(
    r"^\s*(?:inline\s+)?constexpr\s+(?:float|double)\s+(k\w+)\s*=\s*([^;]+);", re.M
)
# A C floating literal ("0.5f", "1.f", "1e-5", "0.044715f"); the f suffix is dropped.
FLOAT_LITERAL = re.compile(
    r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)[fF]?(?![\w.])"
)
_OPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.LShift)


def _evaluate(expr: str, known: dict[str, int]) -> int:
    """Integer C arithmetic (``/`` on non-negative ints is floor division)."""
    tree = ast.parse(expr.replace("/", "//"), mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in known:
            return known[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, _OPS):
            a, b = ev(node.left), ev(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.LShift: a << b,
                    ast.FloorDiv: a // b if b else 0, ast.Mod: a % b if b else 0}[type(node.op)]  # fmt: skip
        raise ValueError(f"cannot evaluate {expr!r}")

    return ev(tree)


@functools.cache
def constants(filename: str) -> dict[str, int]:
    """{kName: value} of the file's file-scope ``constexpr int`` constants."""
    with open(os.path.join(CSRC, filename)) as f:
        text = f.read()
    known: dict[str, int] = {}
    for name, expr in _LINE.findall(text):
        known[name] = _evaluate(expr.strip(), known)
    return known


def sources() -> list[str]:
    """File names of every CUDA C++ source and header in csrc/."""
    paths = glob.glob(os.path.join(CSRC, "*"))
    return sorted(os.path.basename(p) for p in paths if p.endswith((".cu", ".cuh", ".h", ".cpp")))


def code(filename: str) -> str:
    """The file without its comments (csrc/ has no comment marks inside string literals)."""
    with open(os.path.join(CSRC, filename)) as f:
        text = f.read()
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


@functools.cache
def float_constants(filename: str) -> dict[str, float]:
    """{kName: value} of the file's ``constexpr float|double kName = <literal>;`` constants."""
    found = {}
    for name, literal in _FLOAT_LINE.findall(code(filename)):
        match = FLOAT_LITERAL.fullmatch(literal.strip())
        if match is None:
            raise ValueError(f"csrc/{filename}: {name} = {literal.strip()} is not a float literal")
        found[name] = float(match.group(1))
    return found
