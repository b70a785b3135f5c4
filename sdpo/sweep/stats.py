"""Seed statistics for sweep tables: the mean over seeds with a 95% Student t confidence interval, and whether two
methods' intervals overlap.

The interval is mean +- t(0.975, n - 1) * s / sqrt(n), s the sample standard deviation over the n seeds: the usual
interval for a mean when the seed-to-seed spread is estimated from the seeds themselves. With one seed there is no
interval. The t quantile uses the closed form of Student's t distribution for whole degrees of freedom
(Abramowitz & Stegun 26.7.3-4), inverted by bisection: no scipy needed.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
import statistics


def t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (whole) degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = confidence: t(0.975, df) for a 95% interval."""
    low, high = 0.0, 1.0
    while t_two_sided(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low < 1e-13 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Estimate:
    """The mean of per-seed values and its 95% interval (None with fewer than 2 values)."""

    values: tuple[float, ...]
    mean: float
    half_width: float | None

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def text(self, digits: int = 3) -> str:
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (one seed)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def estimate(values: list[float], confidence: float = 0.95) -> Estimate:
    if not values:
        raise ValueError("no values to estimate from")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(tuple(values), mean, None)
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return Estimate(tuple(values), mean, t_quantile(confidence, len(values) - 1) * sem)


def separated(a: Estimate, b: Estimate) -> bool:
    """Whether two intervals are disjoint. Without an interval (one seed) nothing is separated."""
    if a.half_width is None or b.half_width is None:
        return False
    return a.high < b.low or b.high < a.low  # type: ignore[operator]
