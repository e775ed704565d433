"""Summaries of interleaved rounds: medians, quartiles, paired overheads and ratios."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(
    rounds: dict[str, list[float]], baseline: str, *, digits: int = 2
) -> dict[str, dict[str, Any]]:
    """Per variant: median, quartiles, min, ratio to ``baseline`` and paired overhead.

    The overhead is the median over rounds of (variant - baseline) in the same round, so a
    slow patch of the machine moves both sides of each difference.
    """
    base = rounds[baseline]
    base_median = statistics.median(base)
    summary: dict[str, dict[str, Any]] = {}
    for name, values in rounds.items():
        median = statistics.median(values)
        paired = [value - base_value for value, base_value in zip(values, base, strict=False)]
        summary[name] = {
            "median": round(median, digits),
            "p25": round(quantile(values, 0.25), digits),
            "p75": round(quantile(values, 0.75), digits),
            "min": round(min(values), digits),
            "overhead": round(statistics.median(paired), digits),
            "ratio": round(median / base_median, 3) if base_median else None,
            "rounds": len(values),
        }
    return summary
