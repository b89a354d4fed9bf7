"""The demo's result table: one row per path, parity and speed side by side."""

from __future__ import annotations

from dataclasses import dataclass

HEADER = ("path", "parity with transformers", "fastlm", "transformers sdpa", "speedup")


@dataclass(frozen=True)
class Row:
    """One fastlm path next to transformers' sdpa on the same input, timed in one process."""

    path: str
    parity: str  # the correctness figure against transformers, already worded
    fastlm_ms: float  # median wall-clock milliseconds per call
    baseline_ms: float
    tokens: int | None = None  # tokens each call generates: adds tokens/s to the timings

    def cells(self) -> tuple[str, ...]:
        return (
            self.path,
            self.parity,
            self._speed(self.fastlm_ms),
            self._speed(self.baseline_ms),
            f"{self.baseline_ms / self.fastlm_ms:.2f}x",
        )

    def _speed(self, ms: float) -> str:
        if self.tokens is None:
            return f"{ms:.1f} ms"
        return f"{ms:.1f} ms = {self.tokens / ms * 1e3:.1f} tok/s"


@dataclass(frozen=True)
class Section:
    """One part of the demo: the line saying what ran, and its rows."""

    title: str
    rows: list[Row]


def format_table(rows: list[Row]) -> str:
    """Rows as aligned text columns, separated by at least two spaces (no cell holds two
    spaces in a row, so ``re.split(r"\\s{2,}", line)`` gives the cells back)."""
    lines = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]

    def render(cells: tuple[str, ...]) -> str:
        # text columns left-aligned, the numeric ones (timings, speedup) right-aligned
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(HEADER), rule, *(render(cells) for cells in lines[1:])])
