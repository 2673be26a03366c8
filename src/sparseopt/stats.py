"""Paired statistics over seeds without SciPy: Student's t distribution for integer degrees of freedom.

The CDF uses the closed finite series of Abramowitz & Stegun 26.7.3-26.7.4 (exact for integer df, which is all a
paired comparison over n seeds needs: df = n - 1); the quantile inverts it by bisection to float precision.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:   # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + ... ))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:        # even: sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... )
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        inside = s * total
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (0 < p < 1), by bisection on :func:`t_cdf`."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences b - a with its t statistic and 95% confidence interval."""

    n: int
    mean: float
    sd: float
    t: float | None          # None with fewer than 2 pairs or no spread
    low: float | None
    high: float | None


def paired_difference(a: list[float], b: list[float]) -> PairedDifference:
    """Paired over seeds: ``a[i]`` and ``b[i]`` come from the same seed."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long non-empty lists of paired values, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b)]
    n, mean = len(diffs), statistics.fmean(diffs)
    if n < 2:
        return PairedDifference(n, mean, 0.0, None, None, None)
    sd = statistics.stdev(diffs)
    if sd == 0:
        return PairedDifference(n, mean, 0.0, None, mean, mean)
    se = sd / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    return PairedDifference(n, mean, sd, mean / se, mean - half, mean + half)
