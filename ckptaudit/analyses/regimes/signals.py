"""The other signals of paper 004's regime detector, and the sampling uncertainty of s_t over the probe set.

The paper's public code (``src/regime/detect.py``) reports, beside the similarity of consecutive fingerprints:

- activation variance over a sliding window: at checkpoint i >= 1, the representations R_j [n_probes, d] of the
  checkpoints j = max(0, i - W + 1) .. i (W = ``window``, default 5, the code's ``variance_window``), variance over
  that window axis (population variance, ddof 0) of every probe and hidden unit, averaged over probes and units.
  The first checkpoint has no value. Units: squared hidden-state units.
- loss curvature: the second finite difference of the loss series, L_i - 2 L_{i-1} + L_{i-2}, at checkpoint i >= 2
  (the code's alignment: its curvature entry for the interval ending at checkpoint i is centred on i - 1, so it uses
  checkpoints i - 2, i - 1, i). Not divided by the step spacing, as in the code; ``curvature_per_step2`` is the
  second divided difference 2 [(L_i - L_{i-1}) / h_2 - (L_{i-1} - L_{i-2}) / h_1] / (h_1 + h_2) (loss per step^2,
  h = step gaps), which equals (L_i - 2 L_{i-1} + L_{i-2}) / h^2 for even spacing.
- its similarity is the mean over probes of the per-probe cosines; ckptaudit's s_t is the cosine of the concatenated
  fingerprints (SPEC 7). Both are reported (``similarity_probe_mean`` is the code's).

Uncertainty. The probes are a sample of inputs (and the built-in tasks' probes are seeded random draws), so every
number averaged over them has a sampling error:

- activation variance: the mean over probes of the per-probe variance v_p; its standard error is
  std(v_p, ddof 1) / sqrt(n_probes).
- s_t: a seeded bootstrap over probes. Replicate b draws n_probes probes with replacement (multinomial counts w_b,
  numpy ``default_rng(seed)``); the same draw is used at every checkpoint, so a replicate is a whole run seen
  through another probe set: s_b(t) = w_b . dot_t / sqrt((w_b . |a_t|^2)(w_b . |a_{t-1}|^2)) with the per-probe
  dot products and squared norms of consecutive representations. Reported: the bootstrap standard error (std over
  replicates, ddof 1) and the percentile interval at ``level`` (default 95%) of s_t; for adaptive thresholds the
  same interval of LOW / HIGH (the percentiles of each replicate's own series); and per checkpoint the share of
  replicates whose regime (with that replicate's thresholds) equals the reported one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptaudit.report.tree import TreeResult

DEFAULT_VARIANCE_WINDOW = 5
DEFAULT_BOOTSTRAP = 200
DEFAULT_LEVEL = 0.95


class SignalCollector:
    """Called by ``run_fingerprints(observe=...)`` with each checkpoint's representation [n_probes, d] (float64)
    and the previous one (None first): keeps per-probe dot products and squared norms of consecutive
    representations, and the windowed activation variance with its standard error. Holds ``window`` reps."""

    def __init__(self, window: int = DEFAULT_VARIANCE_WINDOW):
        if window < 2:
            raise ValueError("the variance window needs at least 2 checkpoints")
        self.window = int(window)
        self._recent: deque[torch.Tensor] = deque(maxlen=self.window)
        self.dots: list[np.ndarray | None] = []
        self.sq_now: list[np.ndarray | None] = []
        self.sq_prev: list[np.ndarray | None] = []
        self.variance: list[float] = []
        self.variance_se: list[float] = []

    def __call__(self, rep: torch.Tensor, previous: torch.Tensor | None) -> None:
        rep = rep.double().reshape(rep.shape[0], -1).cpu()
        if previous is None:
            self.dots.append(None)
            self.sq_now.append(None)
            self.sq_prev.append(None)
        else:
            prev = previous.double().reshape(previous.shape[0], -1).cpu()
            self.dots.append((rep * prev).sum(1).numpy())
            self.sq_now.append((rep * rep).sum(1).numpy())
            self.sq_prev.append((prev * prev).sum(1).numpy())
        self._recent.append(rep)
        if len(self._recent) < 2:
            self.variance.append(math.nan)
            self.variance_se.append(math.nan)
            return
        stack = torch.stack(list(self._recent))  # [w, n_probes, d]
        per_probe = stack.var(dim=0, unbiased=False).mean(dim=1).numpy()  # v_p
        n = per_probe.size
        self.variance.append(float(per_probe.mean()))
        self.variance_se.append(float(per_probe.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan)

    def probe_mean_similarity(self) -> list[float]:
        """The paper's code's s_t: mean over probes of the per-probe cosine (NaN first)."""
        out = []
        for d, a, b in zip(self.dots, self.sq_now, self.sq_prev, strict=True):
            if d is None:
                out.append(math.nan)
                continue
            den = np.sqrt(a * b)
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append(float(np.mean(np.where(den > 0, d / np.where(den > 0, den, 1.0), np.nan))))
        return out


def loss_curvature(steps: Sequence[int], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(second difference L_i - 2L_{i-1} + L_{i-2}, second divided difference per step^2), NaN for i < 2."""
    L = np.asarray(losses, dtype=np.float64)
    t = np.asarray(steps, dtype=np.float64)
    d2 = np.full(L.shape, np.nan)
    dd = np.full(L.shape, np.nan)
    if L.size >= 3:
        d2[2:] = L[2:] - 2 * L[1:-1] + L[:-2]
        h1, h2 = t[1:-1] - t[:-2], t[2:] - t[1:-1]
        dd[2:] = 2 * ((L[2:] - L[1:-1]) / h2 - (L[1:-1] - L[:-2]) / h1) / (h1 + h2)
    return d2, dd


def _percentile_thresholds(s: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    s = s[np.isfinite(s)]
    if not s.size:
        return math.nan, math.nan
    lo, hi = np.percentile(s, percentiles)
    return float(lo), float(hi)


def _labels(s: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Codes 0 chaotic, 1 transition, 2 stable, -1 unknown; ``low``/``high`` broadcast against ``s``."""
    out = np.where(s > high, 2, np.where(s < low, 0, 1))
    return np.where(np.isfinite(s) & np.isfinite(low) & np.isfinite(high), out, -1)


_CODE = {"chaotic": 0, "transition": 1, "stable": 2}


def similarity_bootstrap(collector: SignalCollector, regimes: Sequence[str], fixed: tuple[float, float] | None,
                         percentiles: Sequence[float], n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                         level: float = DEFAULT_LEVEL) -> dict[str, Any] | None:
    """Bootstrap over probes of s_t, the thresholds and the regimes (module docstring); None when n_boot < 2 or no
    checkpoint pair exists."""
    rows = [i for i, d in enumerate(collector.dots) if d is not None]
    if n_boot < 2 or not rows:
        return None
    n = collector.dots[rows[0]].size
    T = len(collector.dots)
    rng = np.random.default_rng(int(seed))
    W = rng.multinomial(n, np.full(n, 1.0 / n), size=int(n_boot)).astype(np.float64)  # [B, n_probes]
    S = np.full((int(n_boot), T), np.nan)
    for i in rows:
        num = W @ collector.dots[i]
        den = np.sqrt((W @ collector.sq_now[i]) * (W @ collector.sq_prev[i]))
        with np.errstate(invalid="ignore", divide="ignore"):
            S[:, i] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    tail = (1.0 - level) / 2 * 100
    if fixed is not None:
        low = np.full(int(n_boot), float(fixed[0]))
        high = np.full(int(n_boot), float(fixed[1]))
    else:
        th = np.array([_percentile_thresholds(S[b], percentiles) for b in range(int(n_boot))])
        low, high = th[:, 0], th[:, 1]
    lab = _labels(S, low[:, None], high[:, None])  # [B, T]
    reported = np.array([_CODE.get(r, -1) for r in regimes])
    agree = np.full(T, np.nan)
    for i in rows:
        if reported[i] >= 0:
            agree[i] = float(np.mean(lab[:, i] == reported[i]))
    se = np.array([float(np.std(c[np.isfinite(c)], ddof=1)) if np.isfinite(c).sum() > 1 else math.nan for c in S.T])
    out: dict[str, Any] = {
        "n_boot": int(n_boot), "seed": int(seed), "level": float(level), "resampled": f"{n} probes with replacement",
        "similarity_se": se,
        "similarity_ci_low": _nanpercentile_cols(S, tail), "similarity_ci_high": _nanpercentile_cols(S, 100 - tail),
        "regime_agreement": agree,
        "regime_agreement_mean": float(np.nanmean(agree)) if np.isfinite(agree).any() else None,
    }
    if fixed is None:
        out["thresholds_ci"] = {"low": [_pct(low, tail), _pct(low, 100 - tail)],
                                "high": [_pct(high, tail), _pct(high, 100 - tail)]}
    return out


def _pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if x.size else math.nan


def _nanpercentile_cols(S: np.ndarray, q: float) -> np.ndarray:
    return np.array([_pct(S[:, i], q) for i in range(S.shape[1])])


def _nan_none(x: Any) -> list[float | None]:
    return [None if v is None or not math.isfinite(float(v)) else float(v) for v in np.asarray(x, dtype=np.float64)]


@dataclass(frozen=True, eq=False)
class RegimeSignals(TreeResult):
    """Per checkpoint (aligned with the regimes' steps): activation variance and its standard error, the loss and
    its curvature (None when no loss was available, with ``loss_source`` saying why), the paper's code's probe-mean
    similarity, and the bootstrap of s_t (None when disabled)."""

    variance_window: int
    variance: np.ndarray
    variance_se: np.ndarray
    similarity_probe_mean: np.ndarray
    loss: np.ndarray | None
    loss_source: str
    curvature: np.ndarray | None
    curvature_per_step2: np.ndarray | None
    bootstrap: dict[str, Any] | None

    @classmethod
    def build(cls, steps: Sequence[int], collector: SignalCollector, regimes: Sequence[str],
              fixed: tuple[float, float] | None, percentiles: Sequence[float], losses: Sequence[float] | None,
              loss_source: str, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> RegimeSignals:
        """Everything from one fingerprint pass (``collector``) and the per-checkpoint losses (or None)."""
        curv = dd = None
        loss = None
        if losses is not None:
            loss = np.asarray([math.nan if v is None else float(v) for v in losses], dtype=np.float64)
            curv, dd = loss_curvature(steps, loss)
        return cls(collector.window, np.asarray(collector.variance), np.asarray(collector.variance_se),
                   np.asarray(collector.probe_mean_similarity()), loss, loss_source, curv, dd,
                   similarity_bootstrap(collector, regimes, fixed, percentiles, n_boot, seed, level))

    # Without a loss (or with the bootstrap off) the report leaves those datasets out; --json says null.
    HDF5_SKIP_NONE = frozenset({"loss", "loss_curvature", "loss_curvature_per_step2", "bootstrap"})

    def to_tree(self) -> dict[str, Any]:
        """Keys merged into the regimes result: activation_variance, activation_variance_se, variance_window,
        similarity_probe_mean, loss, loss_source, loss_curvature, loss_curvature_per_step2, bootstrap; series as
        float64 arrays (NaN where undefined; null in --json), bootstrap as a subtree."""
        boot = None
        if self.bootstrap is not None:
            boot = dict(self.bootstrap)
            th = boot.pop("thresholds_ci", None)
            if th is not None:
                boot["thresholds_ci"] = {k: np.asarray(v, dtype=np.float64) for k, v in th.items()}
        return {
            "activation_variance": self.variance, "activation_variance_se": self.variance_se,
            "variance_window": self.variance_window, "similarity_probe_mean": self.similarity_probe_mean,
            "loss": self.loss, "loss_source": self.loss_source, "loss_curvature": self.curvature,
            "loss_curvature_per_step2": self.curvature_per_step2, "bootstrap": boot,
        }


def losses_from_log_history(log_history: Sequence[dict], steps: Sequence[int], key: str = "eval_loss") -> list[float | None]:
    """The logged ``key`` at each of ``steps`` from a trainer_state.json ``log_history`` (the last entry logged at
    that exact step; None where none is)."""
    at: dict[int, float] = {}
    for e in log_history:
        v = e.get(key)
        if "step" in e and isinstance(v, (int, float)) and math.isfinite(float(v)):
            at[int(e["step"])] = float(v)
    return [at.get(int(s)) for s in steps]
