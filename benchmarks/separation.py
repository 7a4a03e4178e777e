"""Is a difference between two methods separated from the noise? Intervals over seeds and a power estimate.

Pure functions over per-seed final numbers (one value per seed and method), used by
``benchmarks/loop_claims.py``; tested in tests/test_benchmarks.py against simulation.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["difference_interval", "evaluation_interval", "seeds_to_separate"]


def difference_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Mean of ``a`` minus mean of ``b`` with Welch's ``level`` confidence interval over seeds.

    Welch's interval does not assume the two methods vary as much over seeds; with two or three
    seeds per method its t quantile is large, which is the honest width of so few runs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"An interval over seeds needs at least 2 seeds per method (got {len(a)} and {len(b)}).")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": diff, "low": diff, "high": diff, "se": 0.0, "df": float("inf"), "separated": diff != 0.0}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "se": se, "df": float(df),
            "separated": bool(diff - half > 0 or diff + half < 0)}


def evaluation_interval(diff: float, sem_a: float, sem_b: float, seeds: int, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` interval of a difference of seed means from the evaluation images alone.

    ``sem_a``/``sem_b`` are one run's standard errors over its evaluation images; the mean over
    ``seeds`` runs has ``sem / sqrt(seeds)`` if the runs' evaluation errors were independent. They
    share the evaluation noise (fixed seeds), so this is an approximation, reported beside the
    interval over seeds, which already contains the evaluation error of every run."""
    z = float(stats.norm.ppf(0.5 + level / 2))
    half = z * math.sqrt((sem_a**2 + sem_b**2) / seeds)
    return diff - half, diff + half


def seeds_to_separate(diff: float, sd: float, alpha: float = 0.05, power: float = 0.8, max_seeds: int = 10_000) -> int:
    """Seeds per method a two-sided two-sample t-test needs to detect ``diff`` with ``power``,
    when one run's final number varies with standard deviation ``sd`` over seeds (the exact
    noncentral-t power, not the normal approximation, which undercounts at small n)."""
    if diff == 0:  # no difference is ever separated, however steady the runs
        return max_seeds
    if sd <= 0:
        return 2
    effect = abs(diff) / sd
    for n in range(2, max_seeds + 1):
        df = 2 * n - 2
        critical = stats.t.ppf(1 - alpha / 2, df)
        noncentrality = effect * math.sqrt(n / 2)
        achieved = stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality)
        if achieved >= power or not math.isfinite(achieved):  # scipy gives nan past a noncentrality of ~1e12: power 1
            return n
    return max_seeds
