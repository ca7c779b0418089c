"""Seed statistics for small experiments: the paired t-test with its confidence interval, Holm's
correction over a family of tests, and the power of the paired t-test (the seed count a design needs).
Pure Python (no scipy); the Student-t tail comes from the regularized incomplete beta function, I_x(a, b),
evaluated by its continued fraction (Lentz's method):

    P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2)     for T ~ Student-t with df degrees of freedom

and the noncentral t tail from one integral over the chi distribution (`nct_sf`).
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


# ------------------------------------------------------------------------------------------------ power


def _normal_sf(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def nct_sf(t: float, df: int, ncp: float, intervals: int = 2000) -> float:
    """P(T' > t) for the noncentral t, T' = (Z + ncp) / S with Z ~ N(0, 1) and S = sqrt(V / df), V ~ chi^2_df:

        P(T' > t) = E_S[ Q(t S - ncp) ] = integral_0^inf Q(t s - ncp) f_S(s) ds,   Q(x) = P(Z > x),
        f_S(s) = 2 (df / 2)^(df / 2) / Gamma(df / 2) s^(df - 1) exp(-df s^2 / 2)

    by composite Simpson (`intervals` per piece) over the range where V's density is not negligible, the
    window where Q changes from 1 to 0 integrated as its own piece (absolute error below 1e-9 in the tests;
    ncp = 0 gives the central t tail, which tests compare with `t_two_sided_p`)."""
    if df < 1:
        raise ValueError(f"nct_sf: df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    half = df / 2.0
    log_norm = math.log(2.0) + half * math.log(half) - math.lgamma(half)
    spread = 20.0 * math.sqrt(2.0 * df)  # V = chi^2_df has mean df and sd sqrt(2 df)
    lo = math.sqrt(max(0.0, df - spread) / df)
    hi = math.sqrt((df + spread + 60.0) / df)

    def integrand(s: float) -> float:
        if s <= 0.0:
            density = math.exp(log_norm) if df == 1 else 0.0
        else:
            density = math.exp(log_norm + (df - 1) * math.log(s) - df * s * s / 2.0)
        return _normal_sf(t * s - ncp) * density

    # Q(t s - ncp) turns from 1 to 0 within a few 1/|t| of s = ncp / t: that window gets its own grid
    cuts = {lo, hi}
    if t != 0.0:
        for edge in (ncp / t - 10.0 / abs(t), ncp / t + 10.0 / abs(t)):
            if lo < edge < hi:
                cuts.add(edge)
    points = sorted(cuts)
    total = 0.0
    for a, b in zip(points, points[1:]):
        h = (b - a) / intervals
        part = integrand(a) + integrand(b)
        for i in range(1, intervals):
            part += (4.0 if i % 2 else 2.0) * integrand(a + i * h)
        total += part * h / 3.0
    return min(1.0, max(0.0, total))


def paired_t_power(d: float, n: int, alpha: float = 0.05, one_sided: bool = True) -> float:
    """Power of the paired t-test over n seed pairs (df = n - 1) at the standardized effect d = mean / sd of
    the per-seed differences (Cohen's d_z):

        ncp = d sqrt(n);   one-sided (H1: mean > 0):  power = P(T'_{n-1, ncp} > t_{1-alpha, n-1})
                           two-sided:                 power = P(T' > c) + P(T' < -c),  c = t_{1-alpha/2, n-1}

    (P(T'_ncp < -c) = P(T'_-ncp > c)). A one-sided test at d <= 0 has power <= alpha."""
    if n < 2:
        raise ValueError(f"paired_t_power: need n >= 2 seed pairs, got {n}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"paired_t_power: alpha must be in (0, 0.5), got {alpha}")
    df, ncp = n - 1, d * math.sqrt(n)
    if one_sided:
        return nct_sf(t_quantile(1.0 - alpha, df), df, ncp)
    c = t_quantile(1.0 - alpha / 2.0, df)
    return min(1.0, nct_sf(c, df, ncp) + nct_sf(c, df, -ncp))


def seeds_for_power(d: float, alpha: float = 0.05, power: float = 0.8, one_sided: bool = True,
                    n_min: int = 2, n_max: int = 10_000) -> int:
    """The smallest number of seed pairs n >= n_min whose paired t-test reaches `power` at effect d (d_z)."""
    if not 0.0 < power < 1.0:
        raise ValueError(f"seeds_for_power: power must be in (0, 1), got {power}")
    if d == 0.0 or (one_sided and d < 0.0):
        raise ValueError(f"seeds_for_power: no n reaches power {power} at d = {d}"
                         + (" (a one-sided test of mean > 0 needs d > 0)" if one_sided else ""))
    n = max(2, n_min)
    while paired_t_power(d, n, alpha, one_sided) < power:
        n += 1
        if n > n_max:
            raise ValueError(f"seeds_for_power: more than {n_max} seed pairs needed at d = {d}")
    return n


def minimal_detectable_effect(n: int, alpha: float = 0.05, power: float = 0.8, one_sided: bool = True) -> float:
    """The smallest d (d_z) that n seed pairs detect with the given power (bisection; power rises with d)."""
    lo, hi = 0.0, 1.0
    while paired_t_power(hi, n, alpha, one_sided) < power:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if paired_t_power(mid, n, alpha, one_sided) < power:
            lo = mid
        else:
            hi = mid
    return hi
