"""The CUDA C++ kernels' math, read from csrc/ and checked on a CPU.

No CPU test runs the CUDA kernels, so a wrong digit in one of their constants (GELU's
0.044715 or sqrt(2/pi), log2(e) in the attention softmax) would pass every other CPU test.
Here:

- every ``constexpr float kName`` in csrc/ equals its math value (math module, or
  fastlm.reference for GELU's fitted 0.044715) to within one unit in the last place of a
  double, so a change to any digit the compiler reads fails (digits past the 17th
  significant one cannot change the compiled value); a new constant needs an entry here;
- the GELU formulas of bias_act.cu, translated from their C expressions and evaluated in
  fp64, equal fastlm.reference's gelu and gelu' (this covers their plain coefficients, 0.5
  and 3, too);
- no other float literal than 0 and 1 appears in csrc/ outside those two places, so no
  unnamed constant (an eps default, a scale) escapes the checks above.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from fastlm.reference import ffn as reference
from tests.csrc.csrc_constants import FLOAT_LITERAL, code, float_constants, sources

MATH_VALUES = {
    "kLog2e": math.log2(math.e),  # the softmax runs in base 2: exp(x) = 2^(x log2 e)
    "kLn2": math.log(2.0),  # and back: lse = lse2 ln 2
    "kSqrt1_2": math.sqrt(0.5),  # erf GELU: Phi(h) = (1 + erf(h / sqrt 2)) / 2
    "kInvSqrt2Pi": 1.0 / math.sqrt(2.0 * math.pi),  # erf GELU': phi(h) = exp(-h^2/2) / sqrt(2 pi)
    "kK0": math.sqrt(2.0 / math.pi),  # tanh GELU: u = sqrt(2/pi) (h + 0.044715 h^3)
    "kK1": reference.GELU_TANH_CUBIC,
}

CONSTANTS = [(f, name, value) for f in sources() for name, value in float_constants(f).items()]


def test_every_csrc_math_constant_is_checked():
    found = {name for _, name, _ in CONSTANTS}
    assert found == set(MATH_VALUES), (
        f"csrc/ constants without a value to check: {sorted(found - set(MATH_VALUES))}; "
        f"checked names no longer in csrc/: {sorted(set(MATH_VALUES) - found)}"
    )


@pytest.mark.parametrize(
    ("filename", "name", "value"), CONSTANTS, ids=[f"{f}:{n}" for f, n, _ in CONSTANTS]
)
def test_csrc_constant_equals_its_math_value(filename, name, value):
    expected = MATH_VALUES[name]
    assert abs(value - expected) <= math.ulp(expected), (
        f"csrc/{filename}: {name} = {value!r}, expected {expected!r}"
    )


# ------------------------------------------------------------------ bias_act.cu's GELU

GELU_FUNCTIONS = ("gelu", "gelu_grad")
_C_MATH = {"erff": torch.erf, "tanhf": torch.tanh, "expf": torch.exp}


def _braced(text: str, open_at: int) -> tuple[str, int]:
    """The text inside the brace at ``open_at`` and the index just past its closing brace."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1 : i], i + 1
    raise ValueError("unbalanced braces")


def _device_function(source: str, name: str) -> tuple[int, int, str]:
    """(start, end, body) of ``float name(float h) { ... }`` in ``source``."""
    head = re.search(rf"\bfloat\s+{name}\s*\(\s*float\s+h\s*\)\s*\{{", source)
    assert head, f"bias_act.cu: no float {name}(float h)"
    body, end = _braced(source, head.end() - 1)
    return head.start(), end, body


def _gelu_branches(body: str) -> dict[str, str]:
    """{"none": erf branch, "tanh": tanh branch} of ``if constexpr (MODE == Gelu::kErf)``."""
    at = re.search(r"if\s+constexpr\s*\(\s*MODE\s*==\s*Gelu::kErf\s*\)\s*\{", body)
    erf_branch, after = _braced(body, at.end() - 1)
    tanh_branch, _ = _braced(body, body.index("{", body.index("else", after)))
    return {"none": erf_branch, "tanh": tanh_branch}


def _evaluate(branch: str, h: torch.Tensor) -> torch.Tensor:
    """Runs a branch of ``const float x = <expr>;`` lines and a ``return <expr>;`` with fp64
    tensors: C float literals lose their f suffix, erff/tanhf/expf become torch's."""
    scope = {"h": h, **_C_MATH, **float_constants("bias_act.cu")}
    for statement in filter(None, (s.strip() for s in branch.split(";"))):
        expr = FLOAT_LITERAL.sub(r"\1", statement)
        if expr.startswith("return "):
            return eval(expr.removeprefix("return "), {"__builtins__": {}}, scope)
        name, value = re.fullmatch(r"const\s+float\s+(\w+)\s*=\s*(.+)", expr, re.S).groups()
        scope[name] = eval(value, {"__builtins__": {}}, scope)
    raise ValueError(f"no return in {branch!r}")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("function", GELU_FUNCTIONS)
def test_bias_act_gelu_formula_equals_the_reference(function, approximate):
    h = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    _, _, body = _device_function(code("bias_act.cu"), function)
    got = _evaluate(_gelu_branches(body)[approximate], h)
    want = getattr(reference, function)(h, approximate)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_no_unnamed_float_literal_in_csrc():
    allowed = {0.0, 1.0}
    stray = []
    for filename in sources():
        text = code(filename)
        if filename == "bias_act.cu":  # the GELU formulas: evaluated above
            for name in GELU_FUNCTIONS:
                start, end, _ = _device_function(text, name)
                text = text[:start] + text[end:]
        for line in text.splitlines():
            if re.match(r"\s*(inline\s+)?constexpr\s+(float|double)\b", line):
                continue  # the named constants: checked above
            literals = {float(m.group(1)) for m in FLOAT_LITERAL.finditer(line)}
            stray += [f"csrc/{filename}: {line.strip()}"] if literals - allowed else []
    assert not stray, "float literals other than 0 and 1; name and check them:\n" + "\n".join(stray)
