"""Seed statistics for small experiments: the paired t-test with its confidence interval, and Holm's
correction over a family of tests. Pure Python (no scipy); the Student-t tail comes from the regularized
incomplete beta function, I_x(a, b), evaluated by its continued fraction (Lentz's method):

    P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2)     for T ~ Student-t with df degrees of freedom
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float, iters: int = 300, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_two_sided_p: df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The t value with P(T <= t) = q (bisection on the two-sided tail; 0.5 < q < 1)."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile: q must be in (0.5, 1), got {q}")
    target = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedTest:
    n: int
    df: int
    mean_diff: float  # mean of x - y
    ci95: tuple[float, float]  # 95% confidence interval of the mean difference
    t: float
    p: float  # two-sided


def paired_t(x: list[float], y: list[float]) -> PairedTest:
    """Paired t-test of x - y (seed-paired runs): H0 mean difference 0, two-sided."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"paired_t: need two equal-length samples of >= 2 pairs, got {len(x)} and {len(y)}")
    d = [a - b for a, b in zip(x, y)]
    n = len(d)
    m = sum(d) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        t = 0.0 if m == 0 else math.copysign(math.inf, m)
        return PairedTest(n, n - 1, m, (m, m), t, 1.0 if m == 0 else 0.0)
    t = m / se
    half = t_quantile(0.975, n - 1) * se
    return PairedTest(n, n - 1, m, (m - half, m + half), t, t_two_sided_p(t, n - 1))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given), monotone and capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
