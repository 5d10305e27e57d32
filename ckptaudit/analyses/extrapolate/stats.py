"""The K-consecutive-stable gate and the uncertainty of the acceptance rates (``extrapolate``; SPEC §7, paper 004).

Gate (``--confirm-stable K``, the rule of the paper's code, ``CONSECUTIVE_STABLE_REQUIRED = 2``): walking the
checkpoints in order, the stable run at checkpoint i is the number of consecutive stable checkpoints ending at i
(0 when i is not stable; the first checkpoint, with no similarity, is "unknown" and so 0). A prediction from
checkpoint i is trusted when its stable run is at least K.

Acceptance rates are fractions of n predictions. Beside each rate:

- the Wilson score interval at ``level`` (default 95%): (p + z^2/2n ± z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),
  z the normal quantile; it does not collapse to a point at 0% or 100% as p ± z sqrt(p(1-p)/n) does;
- a seeded bootstrap over the starting checkpoints (numpy ``default_rng(seed)``, the unit a prediction comes from):
  replicate b draws multinomial counts c_b over the distinct starting steps, the same counts for every predictor, K,
  criterion and regime (so differences between rates are paired); a rate's replicate is
  sum_r c_b[step_r] accepted_r / sum_r c_b[step_r] over its predictions r (NaN when none of its steps was drawn),
  and likewise the mean relative weight error. Reported: the standard error (std of the finite replicates, ddof 1)
  and the percentile interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

CRITERIA = ("strict", "adaptive", "proximity")
DEFAULT_BOOTSTRAP = 200
DEFAULT_LEVEL = 0.95


def stable_runs(regimes: Sequence[str]) -> list[int]:
    """Number of consecutive "stable" entries ending at each position (0 where the entry is not stable)."""
    out, run = [], 0
    for r in regimes:
        run = run + 1 if r == "stable" else 0
        out.append(run)
    return out


def trusted(regimes: Sequence[str], k: int) -> list[bool]:
    """Whether each position ends a run of at least ``k`` consecutive stable checkpoints."""
    return [n >= k for n in stable_runs(regimes)]


def wilson_interval(successes: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (NaN, NaN for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    den = 1 + z * z / n
    return max(0.0, (centre - half) / den), min(1.0, (centre + half) / den)


def _se(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1)) if x.size >= 2 else None


def _pct(x: np.ndarray, q: float) -> float | None:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if x.size else None


class RateBootstrap:
    """One draw of resampling counts over the starting steps, shared by every rate it summarises."""

    def __init__(self, steps: Sequence[int], n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                 level: float = DEFAULT_LEVEL):
        self.steps = sorted(set(int(s) for s in steps))
        self.index = {s: i for i, s in enumerate(self.steps)}
        self.n_boot, self.seed, self.level = int(n_boot), int(seed), float(level)
        n = len(self.steps)
        rng = np.random.default_rng(self.seed)
        self.counts = rng.multinomial(n, np.full(n, 1.0 / n), size=self.n_boot).astype(np.float64) if n else None

    @property
    def active(self) -> bool:
        return self.n_boot >= 2 and self.counts is not None

    def replicates(self, rows: Sequence[Any], value: Callable[[Any], float]) -> np.ndarray:
        """[n_boot] weighted means of ``value(row)`` over ``rows`` (rows with a NaN value are left out)."""
        num = np.zeros(len(self.steps))
        den = np.zeros(len(self.steps))
        for r in rows:
            v = float(value(r))
            if math.isfinite(v):
                num[self.index[int(r.step)]] += v
                den[self.index[int(r.step)]] += 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.counts @ num) / (self.counts @ den)

    def summary(self, rows: Sequence[Any], value: Callable[[Any], float]) -> dict[str, Any]:
        """{"se", "ci"} of the weighted mean of ``value`` over ``rows``."""
        reps = self.replicates(rows, value)
        tail = (1.0 - self.level) / 2 * 100
        return {"se": _se(reps), "ci": [_pct(reps, tail), _pct(reps, 100 - tail)]}

    def describe(self) -> dict[str, Any]:
        return {"n_boot": self.n_boot, "seed": self.seed, "level": self.level,
                "resampled": f"{len(self.steps)} starting checkpoints with replacement"}


def rate_uncertainty(rows: Sequence[Any], boot: RateBootstrap | None, level: float = DEFAULT_LEVEL) -> dict:
    """predictor -> str(K) -> criterion -> {"wilson": [lo, hi], "se", "ci"} (se / ci None without a bootstrap)."""
    buckets: dict[tuple[str, int], list[Any]] = {}
    for r in rows:
        buckets.setdefault((r.predictor, r.K), []).append(r)
    out: dict[str, dict[str, dict]] = {}
    for (pred, k), rs in buckets.items():
        entry = {}
        for c in CRITERIA:
            hits = sum(bool(getattr(r, c)) for r in rs)
            cell: dict[str, Any] = {"wilson": list(wilson_interval(hits, len(rs), level)), "se": None, "ci": None}
            if boot is not None and boot.active:
                cell.update(boot.summary(rs, lambda r, c=c: float(bool(getattr(r, c)))))
            entry[c] = cell
        out.setdefault(pred, {})[str(k)] = entry
    return out


def error_uncertainty(rows: Sequence[Any], boot: RateBootstrap | None) -> dict:
    """predictor -> str(K) -> {"se", "ci"} of the mean relative weight error (None where no row has one or without
    a bootstrap)."""
    buckets: dict[tuple[str, int], list[Any]] = {}
    for r in rows:
        buckets.setdefault((r.predictor, r.K), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for (pred, k), rs in buckets.items():
        have = [r for r in rs if r.rel_weight_error is not None and math.isfinite(r.rel_weight_error)]
        cell = None
        if have and boot is not None and boot.active:
            cell = boot.summary(have, lambda r: r.rel_weight_error)
        out.setdefault(pred, {})[str(k)] = cell
    return out
