"""Numbers and names in prose: the formatting every message of gradguard shares."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["fmt", "names", "times"]


def fmt(value: float) -> str:
    """A norm or ratio in 2-3 significant digits: ``0.52``, ``6.3e-09``, ``1.2e+05``."""
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 100 <= abs(value) < 1e4:
        return f"{value:.0f}"
    if 1e-3 <= abs(value) < 100:
        return f"{value:.3g}"
    return f"{value:.1e}"


def times(ratio: float) -> str:
    """A factor for prose: ``120x``, ``3,100x``, ``10^7.9x``."""
    if not ratio > 0 or ratio in (float("inf"),):
        return "inf-x"
    if ratio < 10:
        return f"{ratio:.1f}x"
    if ratio < 1e5:
        return f"{ratio:,.0f}x"
    return f"10^{math.log10(ratio):.1f}x"


def names(layers: Sequence[str], limit: int = 3) -> str:
    """Layer names quoted, the first ``limit`` of them: ``'0', '2' and 3 more``."""
    shown = ", ".join(f"'{name}'" for name in layers[:limit])
    more = len(layers) - limit
    return shown + (f" and {more} more" if more > 0 else "")
