"""The one number formatter of HTML tables, page text and terminal lines.

fmt(v): integers (and floats that are whole numbers below 1e15) as integers with thousands
separators (435,789,003); other floats to `digits` significant digits (0.449, 1.23e-05), with
thousands separators from 1e4 on (12,346); no negative zero (-0.0 is "0"); None,
NaN and Inf as "n/a", "inf", "-inf"; booleans as yes/no; anything else as str().
"""
from __future__ import annotations

import math
from typing import Any


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 text', '2 texts', '30,522 queries': a count with its noun in the right number."""
    return f"{fmt(int(n))} {noun if int(n) == 1 else (plural or noun + 's')}"


def fmt(v: Any, digits: int = 4) -> str:
    try:
        import numpy as np

        if isinstance(v, np.generic):
            v = v.item()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:  # a one-element tensor
        v = v.item()
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if not isinstance(v, float):
        return str(v)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    if abs(v) >= 10 ** digits and abs(v) < 1e15:
        return f"{round(v):,}"
    text = f"{v:.{digits}g}"
    if float(text) == 0.0:  # -0, or a value that rounds to zero at these digits
        return "0"
    if abs(v) < 10 ** digits <= abs(float(text)):  # rounded up to it: 9999.96 is 10,000, not 1e+04
        return f"{int(float(text)):,}"
    return text


def first_line(exc: BaseException, *, typed: bool = False) -> str:
    """An exception's message cut to its first line, for one-line errors (its type's name where it
    has no message); typed: "Type: message". Torch-free, for the CLI's start where torch may not load."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if typed else lines[0]


def seconds(v: float) -> str:
    """A duration for a terminal line: 0.42 s, 6.0 s, 34 s, 2 min 13 s."""
    if v < 10:
        return f"{v:.2g} s" if v < 1 else f"{v:.1f} s"
    if v < 120:
        return f"{v:.0f} s"
    m, s = divmod(int(round(v)), 60)
    return f"{m} min {s} s"
