"""Tables for people: one formatter for the CLI, ``compare`` and the benchmark reports."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table", "fmt", "percent"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    """A fixed-width plain-text table (floats to 4 significant digits), or a markdown one.

    Markdown cells are written as given (``str``), so callers that want a number format pass
    strings; the committed benchmark reports rely on that.
    """
    if markdown:
        cells = [[str(c) for c in r] for r in rows]
        return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                         + ["| " + " | ".join(r) + " |" for r in cells])
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(v, spec: str = ".3g") -> str:
    """``format(v, spec)``, or ``-`` for a missing value (a table cell)."""
    return "-" if v is None else format(v, spec)


def percent(f: float) -> str:
    """A fraction as a percentage without trailing zeros: 0.001 -> ``0.1%``."""
    return f"{100 * f:g}%"
