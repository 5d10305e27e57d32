"""Sampling uncertainty of the sampled-pair statistics of `classify-embeddings` (SPEC 5).

The default mode draws N random pairs, so every statistic has a sampling error. Reported beside each:

- standard errors in closed form: mean of s = c^2 and mean of c: std(ddof 1) / sqrt(N); a fraction p of pairs
  with |c| > 0.3 or 0.5: sqrt(p (1 - p) / N).
- a seeded bootstrap over the sampled pairs (``n_boot`` replicates, numpy ``default_rng(seed)``): each replicate
  draws N of the sampled pairs with replacement and recomputes mean, std and quantiles of s, the two fractions, both
  KS statistics (refitting the Gaussian's mean/std and the exponential's scale to the replicate, as the analysis
  does), the bulk index and the class. Reported: the standard error (std over replicates, ddof 1) and the
  percentile interval at ``level`` (default 95%) of each, and ``class_agreement``, the share of replicates whose
  class equals the reported one.

A replicate is a vector of counts over the sorted sample (multinomial N, uniform), so nothing is re-sorted: the
empirical CDF of the replicate at the i-th sorted value is cumsum(counts)_i / N, and its KS distance to a fitted
continuous CDF F is max_i max(cum_i - F(s_i), F(s_i) - cum_{i-1}) over all sorted values — exactly
``scipy.stats.kstest`` of the resampled values (values a replicate does not hold leave the ECDF flat and cannot
raise the maximum). Quantiles use numpy's default (linear) rule on the replicate's order statistics.

Exact mode (``--exact``) uses every pair: there is no sampling error, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_BOOTSTRAP = 200
DEFAULT_LEVEL = 0.95
_THRESHOLDS = (0.3, 0.5)


def _ks(sorted_s: np.ndarray, cum: np.ndarray, F: np.ndarray, below: float) -> float:
    """KS distance of the ECDF (cum over the sorted values, cum[-1] = 1) to a fitted CDF F at those values."""
    prev = np.concatenate([[0.0], cum[:-1]])
    return float(max(np.max(cum - F), np.max(F - prev), below))


def _weighted_quantiles(sorted_s: np.ndarray, cum_counts: np.ndarray, n: int, levels: Sequence[float]) -> list[float]:
    """numpy's linear quantiles of the resampled array (np.repeat(sorted_s, counts)) without building it."""
    out = []
    for q in levels:
        h = q * (n - 1)
        lo = int(math.floor(h))
        frac = h - lo
        i_lo = int(np.searchsorted(cum_counts, lo, side="right"))
        i_hi = int(np.searchsorted(cum_counts, min(lo + 1, n - 1), side="right"))
        out.append(float(sorted_s[i_lo] + frac * (sorted_s[i_hi] - sorted_s[i_lo])))
    return out


def _stats_of(sorted_s: np.ndarray, counts: np.ndarray, levels: Sequence[float],
              sq: np.ndarray | None = None) -> dict[str, Any]:
    """Every sampled statistic of the replicate that holds ``counts[i]`` copies of ``sorted_s[i]``."""
    from scipy import special

    n = int(counts.sum())
    w = counts.astype(np.float64)
    mean = float(w @ sorted_s / n)
    sq = sorted_s * sorted_s if sq is None else sq
    std = math.sqrt(max(float(w @ sq) / n - mean * mean, 0.0))
    cum_counts = np.cumsum(counts)
    cum = cum_counts / n
    # the frozen scipy distributions' CDFs, written out (the same functions, without the per-call overhead)
    ks_g = _ks(sorted_s, cum, special.ndtr((sorted_s - mean) / std), float(special.ndtr(-mean / std))) if std > 0 else 1.0
    ks_e = _ks(sorted_s, cum, -np.expm1(-sorted_s / mean), 0.0) if mean > 0 else 1.0

    def frac_above(t: float) -> float:
        i = int(np.searchsorted(sorted_s, t * t, side="right"))  # sorted_s[i:] > t^2
        return float(n - (cum_counts[i - 1] if i > 0 else 0)) / n

    return {"mean_c2": mean, "std_c2": std, "quantiles_c2": _weighted_quantiles(sorted_s, cum_counts, n, levels),
            "frac_abs_c_gt_0_3": frac_above(_THRESHOLDS[0]), "frac_abs_c_gt_0_5": frac_above(_THRESHOLDS[1]),
            "ks_gauss": ks_g, "ks_exp": ks_e, "bulk_index": ks_e - ks_g}


def ks_of_sample(s: np.ndarray) -> tuple[float, float]:
    """(KS against the fitted Gaussian, KS against the fitted exponential) of a sample, through the counts path
    (all counts 1): the same numbers as scipy.stats.kstest on ``s``."""
    srt = np.sort(np.asarray(s, dtype=np.float64))
    st = _stats_of(srt, np.ones(srt.size, dtype=np.int64), ())
    return st["ks_gauss"], st["ks_exp"]


def sampled_uncertainty(c: np.ndarray, reported_class: str, levels: Sequence[float], n_boot: int = DEFAULT_BOOTSTRAP,
                        seed: int = 0, level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """Standard errors and (``n_boot`` >= 2) the bootstrap of the sampled overlaps ``c`` (module docstring)."""
    c = np.asarray(c, dtype=np.float64)
    s = c * c
    n = s.size
    out: dict[str, Any] = {"method": f"sampled: {n} random pairs", "standard_error": {
        "mean_c": float(np.std(c, ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "mean_c2": float(np.std(s, ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        **{f"frac_abs_c_gt_{str(t).replace('.', '_')}": math.sqrt(p * (1 - p) / n)
           for t, p in ((t, float(np.count_nonzero(s > t * t)) / n) for t in _THRESHOLDS)},
    }}
    if n_boot < 2:
        out["bootstrap"] = None
        return out
    srt = np.sort(s)
    sq = srt * srt
    rng = np.random.default_rng(int(seed))
    reps = []
    for _ in range(int(n_boot)):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)  # a multinomial(n, uniform) draw over sorted slots
        reps.append(_stats_of(srt, counts, levels, sq))
    tail = (1.0 - level) / 2 * 100
    boot: dict[str, Any] = {"n_boot": int(n_boot), "seed": int(seed), "level": float(level),
                            "resampled": f"{n} sampled pairs with replacement"}
    for key in ("mean_c2", "std_c2", "frac_abs_c_gt_0_3", "frac_abs_c_gt_0_5", "ks_gauss", "ks_exp", "bulk_index"):
        v = np.array([r[key] for r in reps])
        boot[key] = {"se": float(np.std(v, ddof=1)), "ci": [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]}
    q = np.array([r["quantiles_c2"] for r in reps])  # [B, levels]
    boot["quantiles_c2"] = {"se": q.std(axis=0, ddof=1).tolist(),
                            "ci_low": np.percentile(q, tail, axis=0).tolist(),
                            "ci_high": np.percentile(q, 100 - tail, axis=0).tolist()}
    classes = ["A" if r["ks_gauss"] < r["ks_exp"] else "B" for r in reps]
    boot["class_agreement"] = float(np.mean([k == reported_class for k in classes]))
    out["bootstrap"] = boot
    return out


EXACT = {"method": "exact: every pair, no sampling error", "standard_error": None, "bootstrap": None}


def hdf5_tree(u: dict[str, Any]) -> dict[str, Any]:
    """The uncertainty dict for ``report.hdf5.write_tree``: intervals as 2-value datasets, scalars as attributes."""
    out: dict[str, Any] = {"method": u["method"]}
    if u.get("standard_error"):
        out["standard_error"] = dict(u["standard_error"])
    boot = u.get("bootstrap")
    if boot:
        b: dict[str, Any] = {}
        for k, v in boot.items():
            if isinstance(v, dict):
                b[k] = {kk: np.asarray(vv, dtype=np.float64) if isinstance(vv, list) else vv for kk, vv in v.items()}
            else:
                b[k] = v
        out["bootstrap"] = b
    return out
