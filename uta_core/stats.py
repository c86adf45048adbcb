"""Means with 95% confidence intervals, and paired differences, for repeated runs (seeds).

Intervals use Student's t distribution: ``mean +- t(0.975, n-1) * sd / sqrt(n)`` with the sample
standard deviation (ddof=1). A paired difference is the mean of per-seed differences ``arm - baseline``
over the seeds both ran (same seed: same initial weights, data order and mask draws), with the t
interval of those differences; it is *resolved* when its interval excludes 0. With n < 2 there is no
interval (NaN) and nothing is resolved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

LEVEL = 0.95


@dataclass(frozen=True, kw_only=True)
class Interval:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN for n < 2
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (for a difference: the sign is settled at this n)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and its two-sided ``level`` t interval."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        nan = float("nan")
        return Interval(n=0, mean=nan, std=nan, low=nan, high=nan)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(n=1, mean=mean, std=float("nan"), low=float("nan"), high=float("nan"))
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(_scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n=n, mean=mean, std=std, low=mean - half, high=mean + half)


def paired_difference(arm: Mapping[int, float], baseline: Mapping[int, float], level: float = LEVEL) -> Interval:
    """``arm - baseline`` over the seeds both have (``{seed: value}``), with its t interval."""
    seeds = sorted(set(arm) & set(baseline))
    return t_interval([arm[s] - baseline[s] for s in seeds], level)
