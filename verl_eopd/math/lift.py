"""The default run's held-out lift over run seeds (issue 24): each seed's verl file log read into one record,
the lift's spread over seeds, a one-sided t against a target, and a seed-paired comparison of two schedules.
`scripts/lift_seeds.py` launches the seeds and prints these.

    lift = acc(last validated step) - acc(step 0), in points, where acc is verl's greedy held-out accuracy
           `val-core/<data source>/acc/mean@1` x 100
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .curves import read_run
from .stats import paired_t

VAL = ("val-core/", "/acc/mean@1")  # verl's validation key: prefix, data source, suffix


def seed_record(log: Path) -> dict:
    """One run's numbers from its file log: the validation series (%), lift, median step time (s), reverse KL
    first -> last."""
    series = read_run(str(log))
    keys = sorted(k for k in series if k.startswith(VAL[0]) and k.endswith(VAL[1]))
    if len(keys) != 1:
        raise ValueError(f"{log}: expected one {VAL[0]}<data source>{VAL[1]} series, found {keys or 'none'}. Fix: run "
                         f"with trainer.val_before_train=True, a test_freq that validates the last step and one "
                         f"validation data source")
    val = {s: 100 * v for s, v in sorted(series[keys[0]].items())}
    first, last = min(val), max(val)
    if first != 0:
        raise ValueError(f"{log}: the first validation is at step {first}, not 0. Fix: trainer.val_before_train=True")
    step_s = list(series.get("timing_s/step", {}).values())
    rkl = series.get("actor/eopd/rkl_mean", {})
    return {"val_key": keys[0], "val": val, "before": val[0], "after": val[last], "last_step": last,
            "lift": val[last] - val[0], "median_step_s": statistics.median(step_s) if step_s else None,
            "rkl_first_last": [rkl[min(rkl)], rkl[max(rkl)]] if rkl else None}


def lift_stats(lifts: list[float], target: float) -> dict:
    """Mean, SD (n - 1), 95% t interval of the mean lift, how many seeds reach `target`, and the one-sided t-test
    of mean > target (df = n - 1)."""
    n = len(lifts)
    if n < 2:
        raise ValueError(f"lift_stats needs >= 2 seeds, got {n}")
    test = paired_t(lifts, [target] * n)  # the lifts minus the target: its interval, shifted back
    return {"n": n, "df": n - 1, "mean": statistics.fmean(lifts), "sd": statistics.stdev(lifts),
            "ci95": [test.ci95[0] + target, test.ci95[1] + target],
            "reach_target": sum(x >= target for x in lifts), "target": target, "t": test.t,
            "p_one_sided": _p_above(test)}


def _p_above(test) -> float:
    """One-sided p of a paired t-test for a mean difference above 0, from its two-sided p."""
    return test.p / 2 if test.t > 0 else 1 - test.p / 2


def paired_lifts(a: dict[int, float], b: dict[int, float]) -> dict:
    """Seed-paired difference a - b over the seeds both have: mean, 95% t interval, t, two-sided p and the
    one-sided p of a - b > 0."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(f"a paired comparison needs >= 2 seeds in both, got {seeds}")
    test = paired_t([a[s] for s in seeds], [b[s] for s in seeds])
    return {"seeds": seeds, "n": test.n, "df": test.df, "mean_diff": test.mean_diff, "ci95": list(test.ci95),
            "t": test.t, "p_two_sided": test.p, "p_one_sided": _p_above(test)}
