"""Unit conversion at the edges only: the planner works in bytes, FLOP and seconds."""
from __future__ import annotations

from .errors import PlannerError

GiB = 1024 ** 3
TFLOP = 1e12
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def parse_count(text: str, what: str) -> float:
    """'2T' -> 2e12, '300B' -> 3e11, '1.5e12' -> 1.5e12 (token counts and similar)."""
    s = str(text).strip().upper()
    mult = 1.0
    if s and s[-1] in _SUFFIX and not s[-1].isdigit():
        mult, s = _SUFFIX[s[-1]], s[:-1]
    try:
        v = float(s) * mult
    except ValueError:
        raise PlannerError(f"{what}: expected a number such as 2T, 300B or 1.5e12, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise PlannerError(f"{what}: must be a positive finite number, got {text!r}")
    return v
