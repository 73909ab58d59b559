"""Percentiles of latency samples and the median, min and max of repeated runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (0 < fraction <= 1); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of one figure over repeated runs."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every numeric figure that all runs report."""
    if not runs:
        return {}
    keys = [
        key
        for key, value in runs[0].items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    return {key: spread([float(run[key]) for run in runs if key in run]) for key in keys}


def rate_per_s(count: int, elapsed_s: float) -> float:
    return count / elapsed_s if elapsed_s > 0 else math.nan
