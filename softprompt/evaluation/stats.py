"""Intervals and summaries for accuracies: Wilson 95% score intervals, mean and spread over seeds."""
from __future__ import annotations

import math
import statistics
from typing import Dict, Sequence, Tuple

Z95 = 1.959963984540054


def wilson(correct: float, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a proportion ``correct / n`` (``correct`` may be a
    mean count, e.g. mean accuracy x n over seeds evaluated on the same ``n`` rows)."""
    if n <= 0:
        raise ValueError(f"wilson: `n` is {n}; expected a positive number of rows")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson: `correct` is {correct}; expected 0..{n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the ends are exact at 0 and n (rounding would otherwise leave them a hair inside)
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def summarize(accuracies: Sequence[float], n: int) -> Dict[str, float]:
    """Mean, sample standard deviation, min and max over seeds, and the Wilson 95% interval of the mean
    accuracy on ``n`` test rows (the seeds share the rows, so their counts are not pooled)."""
    if not accuracies:
        raise ValueError("summarize: `accuracies` is empty; expected one accuracy per seed")
    mean = statistics.fmean(accuracies)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    low, high = wilson(mean * n, n)
    return {"mean": mean, "std": std, "min": min(accuracies), "max": max(accuracies), "seeds": len(accuracies),
            "n": n, "ci_low": low, "ci_high": high}
