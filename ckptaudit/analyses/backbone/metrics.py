"""Everything SPEC section 1 derives from the T x T Gram matrix of drift rows (no access to parameters needed).

Rows are the checkpoints after the anchor, in step order; x(anchor) = 0 is implicit. With the eigendecomposition
G = U diag(lambda) U^T (lambda descending), sigma_k = sqrt(lambda_k) and the right singular vectors are
V_k = X^T u_k / sigma_k, so every inner product with V_k is a function of G:

- a(t) = <x(t), v_b> = sigma_1 u_1(t); v_b = V_1 with the sign that makes a(last) > 0 (if a(last) == 0, the sign
  that makes sum_t a(t) > 0).
- r_norm(t) = sqrt(max(G_tt - a(t)^2, 0)); f_b(t) = a(t)^2 / G_tt (NaN when x(t) = 0).
- rho_k = lambda_k / trace(G); k95 / k99 = smallest k with cumulative rho >= 0.95 / 0.99.
- window w (rows w .. w+W-1): v^(w) = PC1 of X_w; c(w) = |u^(w)T G[w, :] u_1| / (sigma^(w) sigma_1).
- update u(t) = x(t) - x(t_prev) (t_prev of the first row is the anchor, x = 0):
  C(t) = (a(t) - a(t_prev)) / ||u(t)||, ||u(t)||^2 = G_tt - 2 G_t,tprev + G_tprev,tprev.
- sign-flip step t*: the early sign s0 = sign of the mean of C over the first n_early = max(3, ceil(0.1 n))
  updates (n = number of updates, n_early capped at n); t* = the step of the first update i with
  sign(C(i)) = sign(C(i+1)) = -s0 (the flip holds for two consecutive checkpoints). None when no such i, when
  s0 = 0, or when fewer than 3 updates exist.
- switching direction between rows p and q: c_k = <v_sw, V_k> = (G[p,:] - G[q,:]) u_k / (sigma_k ||x(p)-x(q)||);
  E_{2:6} = sum_{k=2..6} c_k^2 / (1 - c_1^2).
- velocity nu(t) = ||x(t) - x(t_prev)|| / (t - t_prev) (parameter units per step), always from the raw Gram;
  consolidation step = first step s_i such that nu(s_j) < 0.1 max(nu) for every j >= i.

With ``normalize_rows`` the spectral quantities use rows x(t)/||x(t)||, i.e. G_ij / sqrt(G_ii G_jj); the vectors
V_k are then X_n^T u_k / sigma_k and projections of raw differences use the cross Gram X X_n^T = G D
(D = diag(1/||x_j||)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptaudit.report.tree import TreeResult

TOP = 20
EARLY_MIN, EARLY_FRAC = 3, 0.10
CONSOLIDATION_FRAC = 0.10


@dataclass(frozen=True, eq=False)
class SwitchMetrics:
    """Switching direction v_sw = (theta(peak) - theta(trough)) / ||.|| against one group's spectrum."""

    peak: int
    trough: int
    norm: float  # ||theta(peak) - theta(trough)||, parameter units
    backbone_cos_signed: float  # <v_sw, v_b>
    backbone_cos: float  # |<v_sw, v_b>|
    backbone_share: float  # <v_sw, v_b>^2
    e_2_6: float  # sum_{k=2..6} <v_sw_perp, V_k>^2
    pc_cos: np.ndarray  # <v_sw, V_k> for k = 1 .. min(6, rank)

    def to_json(self) -> dict[str, Any]:
        """Keys: peak, trough, norm, abs_cos_backbone, cos_backbone (signed), backbone_share, e_2_6, pc_cos."""
        return {"peak": self.peak, "trough": self.trough, "norm": self.norm, "abs_cos_backbone": self.backbone_cos,
                "cos_backbone": self.backbone_cos_signed, "backbone_share": self.backbone_share,
                "e_2_6": _none_if_nan(self.e_2_6), "pc_cos": _nan_none(self.pc_cos)}


@dataclass(frozen=True, eq=False)
class BackboneResult(TreeResult):
    """Backbone analysis of one parameter group. Arrays over rows have length T (aligned with ``steps``).

    sigma: all T singular values (descending); rho: top ``min(20, T)`` explained fractions (denominator trace G);
    u: left singular vectors [T, T] (columns, sign of column 0 fixed by the a(last) > 0 rule) of the analysed
    Gram; window_alignment: one value per window start (T - W + 1 values, empty when T < W).
    """

    steps: np.ndarray
    anchor_step: int | None
    dim: int | None
    normalize_rows: bool
    window: int
    sigma: np.ndarray
    rho: np.ndarray
    k95: int
    k99: int
    a: np.ndarray
    r_norm: np.ndarray
    f_b: np.ndarray
    window_alignment: np.ndarray
    window_alignment_mean: float | None
    update_alignment: np.ndarray
    sign_flip_step: int | None
    velocity: np.ndarray
    consolidation_step: int | None
    u: np.ndarray = field(repr=False)
    row_scale: np.ndarray = field(repr=False)  # D: 1 (raw) or 1/||x(t)|| (normalised rows)
    switches: tuple[SwitchMetrics, ...] = ()
    #: rotations, speeds, power-law fits, switch projections (:mod:`ckptaudit.analyses.backbone.dynamics`)
    dynamics: Any = field(default=None, repr=False)

    #: in the report only: the row steps, the window start steps, the window and the dimension
    HDF5_ONLY = frozenset({"steps", "window_start_step", "window", "dim"})
    #: only where asked (the role groups G and S): the velocity series and the consolidation step
    VELOCITY_KEYS = ("velocity", "consolidation_step")

    def to_tree(self) -> dict[str, Any]:
        """steps, sigma, rho, k95, k99, a, r_norm, f_b, window_alignment, window_start_step,
        window_alignment_mean, update_alignment, sign_flip_step, window, dim, the dynamics keys
        (BackboneDynamics.to_tree), velocity, consolidation_step."""
        W = self.window
        starts = self.steps[: max(len(self.steps) - W + 1, 0)] if len(self.window_alignment) else self.steps[:0]
        tree: dict[str, Any] = {
            "steps": np.asarray(self.steps, dtype=np.int64), "rho": self.rho, "sigma": self.sigma,
            "k95": int(self.k95), "k99": int(self.k99), "a": self.a, "r_norm": self.r_norm,
            "f_b": np.asarray(self.f_b, dtype=np.float64), "window_alignment": self.window_alignment,
            "window_start_step": np.asarray(starts, dtype=np.int64),
            "window_alignment_mean": self.window_alignment_mean,
            "update_alignment": np.asarray(self.update_alignment, dtype=np.float64),
            "sign_flip_step": self.sign_flip_step, "window": int(W), "dim": self.dim,
        }
        if self.dynamics is not None:
            tree.update(self.dynamics.to_tree())
        tree["velocity"] = self.velocity
        tree["consolidation_step"] = self.consolidation_step
        return tree

    def to_json(self, velocity: bool = False) -> dict[str, Any]:
        """The --json form of :meth:`to_tree`; velocity and consolidation_step only with ``velocity``."""
        out = super().to_json()
        return out if velocity else {k: v for k, v in out.items() if k not in self.VELOCITY_KEYS}

    def to_hdf5_tree(self, velocity: bool = False) -> dict[str, Any]:
        """The report form of :meth:`to_tree`: series as datasets, scalars as attributes; velocity and
        consolidation_step only with ``velocity``."""
        out = super().to_hdf5_tree()
        return out if velocity else {k: v for k, v in out.items() if k not in self.VELOCITY_KEYS}


def _none_if_nan(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _nan_none(x: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(x, dtype=np.float64)]


def normalized_gram(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G_ij / sqrt(G_ii G_jj), scale) with scale_i = 1/||x_i||; zero rows stay zero (scale 0)."""
    d = np.sqrt(np.clip(np.diag(G), 0.0, None))
    s = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    return G * s[:, None] * s[None, :], s


def spectrum(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lambda descending clipped at 0, U columns matching) of a symmetric PSD Gram."""
    lam, U = np.linalg.eigh((G + G.T) / 2)
    order = np.argsort(lam)[::-1]
    return np.clip(lam[order], 0.0, None), U[:, order]


def explained(lam: np.ndarray, top: int = TOP) -> tuple[np.ndarray, int, int]:
    """(rho top ``top``, k95, k99) with rho_k = lambda_k / sum(lambda) (= trace G)."""
    total = float(np.sum(lam))
    if total <= 0:
        return np.zeros(min(top, len(lam))), 0, 0
    rho = lam / total
    cum = np.cumsum(rho)
    # a hair of tolerance so that an exact 0.95 reached in exact arithmetic is not missed by rounding
    k95 = int(np.searchsorted(cum, 0.95 - 1e-12) + 1)
    k99 = int(np.searchsorted(cum, 0.99 - 1e-12) + 1)
    return rho[:top], min(k95, len(lam)), min(k99, len(lam))


def window_alignment(G: np.ndarray, u1: np.ndarray, sigma1: float, window: int) -> np.ndarray:
    """c(w) = |u^(w)T G[w, :] u_1| / (sigma^(w) sigma_1) for every window of ``window`` consecutive rows."""
    T = G.shape[0]
    if window < 1 or T < window or sigma1 <= 0:
        return np.zeros(0)
    gu = G @ u1  # [T]: G[w, :] u_1 for all rows at once
    out = np.empty(T - window + 1)
    for w in range(T - window + 1):
        lam, U = spectrum(G[w : w + window, w : w + window])
        sw = math.sqrt(lam[0])
        out[w] = abs(float(U[:, 0] @ gu[w : w + window])) / (sw * sigma1) if sw > 0 else float("nan")
    return out


def sign_flip_step(C: np.ndarray, steps: Sequence[int]) -> int | None:
    """First step where sign(C) opposes the early-mean sign and stays so for 2 checkpoints (module docstring)."""
    n = len(C)
    if n < EARLY_MIN:
        return None
    n_early = min(n, max(EARLY_MIN, math.ceil(EARLY_FRAC * n)))
    early = np.asarray(C[:n_early], dtype=np.float64)
    early = early[np.isfinite(early)]
    if early.size == 0:
        return None
    s0 = np.sign(early.mean())
    if s0 == 0:
        return None
    for i in range(n - 1):
        if np.sign(C[i]) == -s0 and np.sign(C[i + 1]) == -s0:
            return int(steps[i])
    return None


def consolidation_step(nu: np.ndarray, steps: Sequence[int], frac: float = CONSOLIDATION_FRAC) -> int | None:
    """First step s_i such that nu stays below ``frac`` x peak(nu) from s_i on; None if it never does."""
    nu = np.asarray(nu, dtype=np.float64)
    if nu.size == 0 or not np.isfinite(nu).all() or nu.max() <= 0:
        return None
    below = nu < frac * nu.max()
    if not below[-1]:
        return None
    i = len(nu) - 1
    while i > 0 and below[i - 1]:
        i -= 1
    return int(steps[i])


def pad_anchor(G: np.ndarray) -> np.ndarray:
    """Gram [T+1, T+1] with the anchor (x = 0) as row 0."""
    T = G.shape[0]
    E = np.zeros((T + 1, T + 1))
    E[1:, 1:] = G
    return E


def consecutive_norms(G: np.ndarray) -> np.ndarray:
    """||x(t) - x(t_prev)|| for every row (t_prev of row 0 is the anchor, x = 0)."""
    E = pad_anchor(G)
    d = np.diag(E)
    return np.sqrt(np.clip(d[1:] - 2 * np.diag(E, 1) + d[:-1], 0.0, None))


def velocity(G: np.ndarray, steps: Sequence[int], anchor_step: int | None) -> np.ndarray:
    """nu(t) = ||theta(t) - theta(t_prev)|| / (t - t_prev); the first row's t_prev is the anchor (NaN if unknown)."""
    steps = np.asarray(steps, dtype=np.float64)
    prev = np.concatenate([[np.nan if anchor_step is None else float(anchor_step)], steps[:-1]])
    return consecutive_norms(G) / (steps - prev)


def switch_metrics(G_raw: np.ndarray, steps: Sequence[int], anchor_step: int | None, lam: np.ndarray,
                   U: np.ndarray, scale: np.ndarray, pairs: Sequence[tuple[int, int]]) -> tuple[SwitchMetrics, ...]:
    """SwitchMetrics per (peak, trough) step pair; the anchor step is allowed (x = 0). See module docstring."""
    index = {int(s): i + 1 for i, s in enumerate(steps)}
    if anchor_step is not None:
        index.setdefault(int(anchor_step), 0)
    E = pad_anchor(G_raw)
    Us = np.vstack([np.zeros((1, U.shape[1])), U * scale[:, None]])  # D u_k with the anchor row (= 0)
    sig = np.sqrt(lam)
    kmax = int(min(6, np.sum(sig > sig[0] * 1e-12))) if sig.size and sig[0] > 0 else 0
    out = []
    for peak, trough in pairs:
        p, q = index[int(peak)], index[int(trough)]
        n2 = E[p, p] - 2 * E[p, q] + E[q, q]
        norm = math.sqrt(max(n2, 0.0))
        if norm == 0 or kmax == 0:
            c = np.full(max(kmax, 1), np.nan)
        else:
            c = (E[p, :] - E[q, :]) @ Us[:, :kmax] / (sig[:kmax] * norm)
        c1 = float(c[0])
        rest = float(np.sum(c[1:6] ** 2))
        e26 = rest / (1 - c1**2) if (1 - c1**2) > 1e-15 else float("nan")
        out.append(SwitchMetrics(int(peak), int(trough), norm, c1, abs(c1), c1**2, e26, np.asarray(c)))
    return tuple(out)


def switch_cosines(G_raw: np.ndarray, steps: Sequence[int], anchor_step: int | None,
                   pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pairwise |cos| between switching directions [n_pairs, n_pairs] (NaN where a direction is zero)."""
    index = {int(s): i + 1 for i, s in enumerate(steps)}
    if anchor_step is not None:
        index.setdefault(int(anchor_step), 0)
    E = pad_anchor(G_raw)
    P = np.zeros((len(pairs), E.shape[0]))  # each switch as a combination of rows: e_p - e_q
    for i, (p, q) in enumerate(pairs):
        P[i, index[int(p)]] += 1.0
        P[i, index[int(q)]] -= 1.0
    M = P @ E @ P.T
    n = np.sqrt(np.clip(np.diag(M), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(M / np.outer(n, n))


def backbone_from_gram(
    G: np.ndarray,
    steps: Sequence[int],
    window: int = 10,
    normalize_rows: bool = False,
    switches: Sequence[tuple[int, int]] = (),
    top: int = TOP,
    anchor_step: int | None = None,
    dim: int | None = None,
    fit_range: tuple[int, int] | None = None,
) -> BackboneResult:
    """All backbone quantities of one group from its Gram G [T, T] (rows = checkpoints after the anchor).

    steps: the T row steps (increasing). anchor_step: the step of x = 0 (velocity of the first row, switches
    involving the anchor). switches: (peak_step, trough_step) pairs among ``steps`` or the anchor step.
    fit_range: (lo, hi) steps of the power-law fits (default: every row, see backbone.dynamics).
    """
    from ckptaudit.analyses.backbone.dynamics import backbone_dynamics

    G = np.asarray(G, dtype=np.float64)
    steps_arr = np.asarray(list(steps), dtype=np.int64)
    T = G.shape[0]
    if G.shape != (T, T) or len(steps_arr) != T:
        raise ValueError(f"Gram of shape {G.shape} does not match {len(steps_arr)} steps")
    if normalize_rows:
        Gu, scale = normalized_gram(G)
    else:
        Gu, scale = G, np.ones(T)
    lam, U = spectrum(Gu)
    sigma = np.sqrt(lam)
    rho, k95, k99 = explained(lam, top)
    u1 = U[:, 0].copy()
    a = sigma[0] * u1
    sgn = np.sign(a[-1]) if abs(a[-1]) > 0 else np.sign(a.sum())
    if sgn < 0:
        u1, a = -u1, -a
        U = U.copy()
        U[:, 0] = u1
    diag = np.clip(np.diag(Gu), 0.0, None)
    r_norm = np.sqrt(np.clip(diag - a**2, 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        f_b = np.where(diag > 0, a**2 / np.where(diag > 0, diag, 1.0), np.nan)
        du = consecutive_norms(Gu)
        a_prev = np.concatenate([[0.0], a[:-1]])
        C = np.where(du > 0, (a - a_prev) / np.where(du > 0, du, 1.0), np.nan)
    wa = window_alignment(Gu, u1, float(sigma[0]) if T else 0.0, window)
    nu = velocity(G, steps_arr, anchor_step)
    sw = switch_metrics(G, steps_arr, anchor_step, lam, U, scale, switches) if switches else ()
    return BackboneResult(
        steps=steps_arr, anchor_step=anchor_step, dim=dim, normalize_rows=normalize_rows, window=window,
        sigma=sigma, rho=rho, k95=k95, k99=k99, a=a, r_norm=r_norm, f_b=f_b, window_alignment=wa,
        # windows of rows that are all zero (checkpoints equal to the anchor) have no PC1: the mean is over the rest
        window_alignment_mean=float(np.mean(wa[np.isfinite(wa)])) if np.isfinite(wa).any() else None,
        update_alignment=C, sign_flip_step=sign_flip_step(C, steps_arr), velocity=nu,
        consolidation_step=consolidation_step(nu, steps_arr) if np.isfinite(nu).all() else None,
        u=U, row_scale=scale, switches=sw,
        dynamics=backbone_dynamics(G, steps_arr, anchor_step, lam, U, scale, window, normalize_rows, switches,
                                   fit_range),
    )


def detect_switches(log_history: Sequence[Mapping[str, Any]], metric: str, steps: Sequence[int]) -> list[tuple[int, int]]:
    """(peak_step, trough_step) pairs from a metric series in trainer_state.json ``log_history``.

    The series is the entries holding ``metric`` (and "step"), in step order. A local maximum is a point strictly
    above its left neighbour and at least its right neighbour (the first point of a plateau); a local minimum
    likewise. End points are never extrema. Each local maximum is paired with the next local minimum after it
    (adjacent extrema). Both are mapped to the nearest checkpoint step of ``steps`` (ties: the earlier step);
    pairs that map to the same checkpoint, and repeated pairs, are dropped. No smoothing: for noisy metrics pass
    explicit ``--switch PEAK:TROUGH`` pairs instead.
    """
    pts = sorted((int(e["step"]), float(e[metric])) for e in log_history
                 if metric in e and "step" in e and e[metric] is not None and math.isfinite(float(e[metric])))
    ck = np.asarray(sorted(int(s) for s in steps), dtype=np.int64)
    if len(pts) < 3 or ck.size == 0:
        return []
    v = [p[1] for p in pts]
    ext: list[tuple[str, int]] = []
    for i in range(1, len(v) - 1):
        if v[i] > v[i - 1] and v[i] >= v[i + 1]:
            ext.append(("max", pts[i][0]))
        elif v[i] < v[i - 1] and v[i] <= v[i + 1]:
            ext.append(("min", pts[i][0]))

    def nearest(s: int) -> int:
        return int(ck[int(np.argmin(np.abs(ck - s)))])  # argmin takes the first (earlier) on ties

    pairs: list[tuple[int, int]] = []
    for j, (kind, s) in enumerate(ext):
        if kind != "max":
            continue
        nxt = next((t for k2, t in ext[j + 1 :] if k2 == "min"), None)
        if nxt is None:
            break
        pair = (nearest(s), nearest(nxt))
        if pair[0] != pair[1] and pair not in pairs:
            pairs.append(pair)
    return pairs
