"""Trajectory dynamics around the backbone (paper 001 and its public code), every one a function of the T x T Gram.

Notation of :mod:`ckptaudit.analyses.backbone.metrics`: rows x(t) = theta(t) - theta(anchor) for the T checkpoints
after the anchor, G = X X^T, the analysed Gram G_a = D G D (D = 1 for raw rows, diag(1/||x(t)||) for normalised
rows) with eigenvectors u_k and sigma_k = sqrt(lambda_k); V_k = X_a^T u_k / sigma_k.

Every direction used here is a combination of drift rows, v = X^T beta (beta in R^T, or over the T + 1 rows with
the anchor's x = 0 first), so every inner product is a quadratic form in G: <X^T beta, X^T gamma> = beta^T G gamma.
The backbone is beta_b = D u_1 / sigma_1; V_k is beta_k = D u_k / sigma_k.

- Backbone coordinate in parameter units: a_p(t) = <x(t), v_b> = (G beta_b)_t (for raw rows this is a(t); for
  normalised rows it is the a(t) of the paper's figures, the raw drift on the row-normalised backbone);
  ||r_p(t)|| = sqrt(G_tt - a_p(t)^2).
- Row-normalised backbone beside the raw one (raw results): the same two series along v_b^(n), the PC1 of the unit
  rows (Gram G_ij / sqrt(G_ii G_jj)), and |<v_b, v_b^(n)>| = |beta_b^T G beta_n|.
- Consecutive-window rotation: the PC1 of window w (rows w .. w+W-1 of the analysed rows, the windows of c(w)) is
  beta_w = D_w u^(w) / s^(w) on those rows; rotation(w) = |<v^(w), v^(w+1)>| = |beta_w^T G beta_{w+1}|, reported as
  |cos| and as the angle arccos(|cos|) in degrees. c(w) compares a window with the global backbone; the rotation
  compares neighbouring windows with each other.
- Local-window rotation (the rotation curve of the paper's public code): window w holds the W checkpoints
  w .. w+W-1 (anchor excluded), its rows are re-anchored at the window's first checkpoint, y_j = x(w+j) - x(w)
  (j = 1..W-1), and normalised to unit length, always (whatever ``--normalize-rows``). With the coefficient matrix
  C_w (rows e_{w+j} - e_w): Y Y^T = C_w G C_w^T, PC1 (u, s) of its normalised form, beta = C_w^T D_c u / s.
- Speeds (parameter units per step, t_prev of the first row = the anchor with a = ||r|| = 0):
  da/dt = (a_p(t) - a_p(t_prev)) / (t - t_prev); d||r||/dt = (||r_p(t)|| - ||r_p(t_prev)||) / (t - t_prev);
  residual speed ||r(t) - r(t_prev)|| / (t - t_prev) (the paper's code's r-dot), from
  ||r(t) - r(s)||^2 = ||x(t) - x(s)||^2 - (a_p(t) - a_p(s))^2 (r is x minus its v_b part).
- Power-law exponents: least-squares line through (log10 tau, log10 |a_p|) and (log10 tau, log10 ||r_p||), with
  tau = t - t_anchor the steps since the anchor (the step itself when the anchor is step 0). Fit range: every row
  with tau > 0 and a non-zero value, restricted to ``fit_range`` (LO, HI, inclusive steps) when given. Reported with
  the slope's standard error (ordinary least squares, n - 2 degrees of freedom), R^2, n and the first/last step used.
- Switching direction v_sw = (x(p) - x(q)) / ||x(p) - x(q)||: with dx_t = <x(t), x(p) - x(q)> = G_tp - G_tq
  (anchor column 0), <x(t), v_sw> = dx_t / ||.||, c_k = <v_sw, V_k> = dx^T beta_k / ||.||, and the residual
  projection <r(t), v_sw> = <x(t), v_sw> - a_p(t) c_1. Capture by PC2..PCk, k = 2..K (K = the PCs with
  lambda_k > 1e-12 lambda_1): sum_{j=2..k} c_j^2 of v_sw itself, and sum_{j=2..k} c_j^2 / (1 - c_1^2) of
  v_sw_perp = (v_sw - c_1 v_b) / ||.|| (V_j is orthogonal to v_b for j >= 2); at k = 6 the latter is E_{2:6}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptaudit.analyses.backbone.metrics import consecutive_norms, normalized_gram, pad_anchor, spectrum
from ckptaudit.report.tree import TreeResult

#: eigenvalues lambda_k <= RANK_TOL * lambda_1 are numerical zeros (a float64 Gram of float32 rows is accurate to
#: ~1e-16 lambda_1): PCs beyond them are not reported in the capture curves.
RANK_TOL = 1e-12


def _f(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _nan_none(x: np.ndarray) -> list[float | None]:
    return [_f(float(v)) for v in np.asarray(x, dtype=np.float64)]


@dataclass(frozen=True)
class PowerLawFit:
    """log10 |y| = intercept + slope * log10(t - t_anchor): a power law |y| ~ tau^slope (see module docstring)."""

    slope: float
    intercept: float
    slope_se: float  # NaN with 2 points
    r2: float
    n: int
    first_step: int
    last_step: int
    excluded: int  # rows left out: tau <= 0, y == 0, non-finite, or outside the fit range

    def to_json(self) -> dict[str, Any]:
        """Keys: slope, intercept, slope_se, r2, n, first_step, last_step, excluded, x ("log10 steps since the
        anchor"), y ("log10 |value|")."""
        return {"slope": _f(self.slope), "intercept": _f(self.intercept), "slope_se": _f(self.slope_se),
                "r2": _f(self.r2), "n": self.n, "first_step": self.first_step, "last_step": self.last_step,
                "excluded": self.excluded, "x": "log10 steps since the anchor", "y": "log10 |value|"}


def power_law_fit(steps: Sequence[int], values: Sequence[float], anchor_step: int | None,
                  fit_range: tuple[int, int] | None = None) -> PowerLawFit | None:
    """Least-squares slope of log10 |values| against log10 (steps - anchor_step); None with fewer than 2 usable
    rows or an unknown anchor. ``fit_range`` (lo, hi): only steps lo <= t <= hi."""
    if anchor_step is None:
        return None
    t = np.asarray(steps, dtype=np.float64)
    y = np.abs(np.asarray(values, dtype=np.float64))
    tau = t - float(anchor_step)
    keep = (tau > 0) & np.isfinite(y) & (y > 0)
    if fit_range is not None:
        keep &= (t >= fit_range[0]) & (t <= fit_range[1])
    n = int(keep.sum())
    if n < 2:
        return None
    lx, ly = np.log10(tau[keep]), np.log10(y[keep])
    mx, my = lx.mean(), ly.mean()
    sxx = float(np.sum((lx - mx) ** 2))
    if sxx <= 0:
        return None
    slope = float(np.sum((lx - mx) * (ly - my)) / sxx)
    intercept = float(my - slope * mx)
    res = ly - (intercept + slope * lx)
    ss_res, ss_tot = float(np.sum(res**2)), float(np.sum((ly - my) ** 2))
    se = math.sqrt(ss_res / (n - 2) / sxx) if n > 2 else math.nan
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    used = t[keep]
    return PowerLawFit(slope, intercept, se, r2, n, int(used[0]), int(used[-1]), int(len(t) - n))


@dataclass(frozen=True, eq=False)
class SwitchDynamics(TreeResult):
    """One switching direction against one group's spectrum: ``residual_projection`` <r(t), v_sw> per row (parameter
    units); ``capture[i]`` / ``capture_perp[i]``: share of v_sw / of v_sw_perp on PC2..PC(i+2)."""

    peak: int
    trough: int
    residual_projection: np.ndarray
    drift_projection: np.ndarray  # <x(t), v_sw>
    capture: np.ndarray
    capture_perp: np.ndarray

    def to_tree(self) -> dict[str, Any]:
        """Keys: residual_projection, drift_projection (per step), capture_pc2_to_k, capture_perp_pc2_to_k
        (entry i: PC2..PC(i+2)), n_pcs."""
        return {"residual_projection": self.residual_projection, "drift_projection": self.drift_projection,
                "capture_pc2_to_k": self.capture, "capture_perp_pc2_to_k": self.capture_perp,
                "n_pcs": int(len(self.capture) + 1)}


@dataclass(frozen=True, eq=False)
class BackboneDynamics:
    """The module docstring's quantities for one parameter group (arrays over rows have length T)."""

    normalize_rows: bool
    window: int
    window_start_step: np.ndarray  # start step of window w for each rotation(w) (pairs w, w+1)
    window_rotation: np.ndarray  # |<v^(w), v^(w+1)>|
    local_window_rotation: np.ndarray  # the paper's code: re-anchored, unit rows
    a_param: np.ndarray
    r_norm_param: np.ndarray
    speed_a: np.ndarray
    speed_r_norm: np.ndarray
    speed_residual: np.ndarray
    loglog_a: PowerLawFit | None
    loglog_r_norm: PowerLawFit | None
    fit_range: tuple[int, int] | None
    a_rownorm: np.ndarray | None = None  # raw results: a along the row-normalised backbone
    r_norm_rownorm: np.ndarray | None = None
    rownorm_backbone_cos: float | None = None  # |<v_b, v_b^(n)>|
    switches: tuple[SwitchDynamics, ...] = ()

    @staticmethod
    def _angles(c: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.degrees(np.arccos(np.clip(c, 0.0, 1.0)))

    @staticmethod
    def _mean(c: np.ndarray) -> float | None:
        c = c[np.isfinite(c)]
        return float(c.mean()) if c.size else None

    @staticmethod
    def _max_angle(c: np.ndarray) -> float | None:
        c = c[np.isfinite(c)]
        return float(np.degrees(np.arccos(np.clip(c.min(), 0.0, 1.0)))) if c.size else None

    def to_tree(self) -> dict[str, Any]:
        """Flat keys merged into the group's tree (README, backbone table of trajectory dynamics): series as float64
        arrays (NaN where undefined; JSON null), start steps as int64, fits as dicts."""
        def series(x: np.ndarray) -> np.ndarray:
            return np.asarray(x, dtype=np.float64)

        out: dict[str, Any] = {
            "window_rotation": series(self.window_rotation),
            "window_rotation_deg": series(self._angles(self.window_rotation)),
            "window_rotation_mean": self._mean(self.window_rotation),
            "window_rotation_max_deg": self._max_angle(self.window_rotation),
            "window_rotation_start_step": np.asarray(self.window_start_step, dtype=np.int64),
            "local_window_rotation": series(self.local_window_rotation),
            "local_window_rotation_deg": series(self._angles(self.local_window_rotation)),
            "local_window_rotation_mean": self._mean(self.local_window_rotation),
            "speed_a": series(self.speed_a), "speed_r_norm": series(self.speed_r_norm),
            "speed_residual": series(self.speed_residual),
            "loglog_a": None if self.loglog_a is None else self.loglog_a.to_json(),
            "loglog_r_norm": None if self.loglog_r_norm is None else self.loglog_r_norm.to_json(),
            "fit_range": None if self.fit_range is None else np.asarray(self.fit_range, dtype=np.int64),
        }
        if self.normalize_rows:
            out["a_param"] = series(self.a_param)
            out["r_norm_param"] = series(self.r_norm_param)
        if self.a_rownorm is not None:
            out["a_rownorm"] = series(self.a_rownorm)
            out["r_norm_rownorm"] = series(self.r_norm_rownorm)
            out["rownorm_backbone_abs_cos"] = _f(self.rownorm_backbone_cos)
        return out


DENSE_MAX = 64  # above this size the top eigenpair comes from Lanczos (ARPACK), not a full eigendecomposition


def top_eigenpair(M: np.ndarray) -> tuple[float, np.ndarray]:
    """(lambda_1, u_1) of a symmetric PSD matrix: dense for small ones; for large ones Lanczos from the fixed start
    vector of ones (deterministic, converged to machine precision), dense again if it does not converge."""
    M = (M + M.T) / 2
    if M.shape[0] > DENSE_MAX:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        try:
            lam, U = eigsh(M, k=1, which="LA", v0=np.ones(M.shape[0]), tol=0)
            return float(max(lam[0], 0.0)), U[:, 0]
        except ArpackNoConvergence:
            pass
    lam, U = spectrum(M)
    return (float(lam[0]), U[:, 0]) if lam.size else (0.0, np.zeros(0))


def _pc1_coef(M: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(u_1 / s_1, s_1) of a PSD Gram, None without a PC1."""
    lam, u = top_eigenpair(M)
    if lam <= 0:
        return None
    s = math.sqrt(lam)
    return u / s, s


Coef = tuple[int, np.ndarray]  # (first row, coefficients on rows first .. first + len - 1): beta on its support


def window_coefficients(Ga: np.ndarray, scale: np.ndarray, window: int) -> list[Coef | None]:
    """beta_w of the PC1 of every window of ``window`` consecutive analysed rows, on its support (None where the
    window has no PC1)."""
    T = Ga.shape[0]
    out: list[Coef | None] = []
    for w in range(max(T - window + 1, 0)):
        pc = _pc1_coef(Ga[w : w + window, w : w + window])
        out.append(None if pc is None else (w, scale[w : w + window] * pc[0]))
    return out


def local_window_coefficients(G: np.ndarray, window: int) -> list[Coef | None]:
    """beta_w of the PC1 of every re-anchored, row-normalised window of ``window`` checkpoints (the paper's code's
    rotation curve), on its support rows w .. w+window-1; None where the window has no PC1."""
    T = G.shape[0]
    out: list[Coef | None] = []
    m = window - 1
    C = np.zeros((m, window))  # rows e_{j} - e_0 over the window's own rows
    C[np.arange(m), 1 + np.arange(m)] = 1.0
    C[:, 0] = -1.0
    for w in range(max(T - window + 1, 0)):
        sub = G[w : w + window, w : w + window]
        Mn, s_c = normalized_gram(C @ sub @ C.T)
        pc = _pc1_coef(Mn)
        out.append(None if pc is None else (w, C.T @ (s_c * pc[0])))
    return out


def _rotation(G: np.ndarray, coefs: list[Coef | None]) -> np.ndarray:
    """|<v^(w), v^(w+1)>| = |beta_w^T G beta_{w+1}| on the two supports (O(W^2) per pair, not O(T^2))."""
    out = np.full(max(len(coefs) - 1, 0), np.nan)
    for w in range(len(coefs) - 1):
        a, b = coefs[w], coefs[w + 1]
        if a is not None and b is not None:
            (la, va), (lb, vb) = a, b
            out[w] = min(abs(float(va @ G[la : la + va.size, lb : lb + vb.size] @ vb)), 1.0)
    return out


def _signed_pc1(Ga: np.ndarray, scale: np.ndarray, G: np.ndarray) -> np.ndarray | None:
    """beta_b of the PC1 of ``Ga``, signed so that a(last) > 0 (else sum a > 0), as in backbone_from_gram."""
    pc = _pc1_coef(Ga)
    if pc is None:
        return None
    beta = scale * pc[0]
    a = G @ beta
    sgn = np.sign(a[-1]) if abs(a[-1]) > 0 else np.sign(a.sum())
    return -beta if sgn < 0 else beta


def backbone_dynamics(
    G: np.ndarray,
    steps: Sequence[int],
    anchor_step: int | None,
    lam: np.ndarray,
    U: np.ndarray,
    scale: np.ndarray,
    window: int,
    normalize_rows: bool,
    switches: Sequence[tuple[int, int]] = (),
    fit_range: tuple[int, int] | None = None,
) -> BackboneDynamics:
    """The dynamics of one group from its raw Gram ``G`` [T, T] and the analysed spectrum (``lam``, ``U`` with the
    backbone's sign already fixed, row ``scale`` D) of backbone_from_gram. ``switches``: (peak, trough) steps among
    ``steps`` or the anchor step."""
    G = np.asarray(G, dtype=np.float64)
    T = G.shape[0]
    steps_arr = np.asarray(list(steps), dtype=np.int64)
    Ga = G * scale[:, None] * scale[None, :]
    sig = np.sqrt(np.clip(lam, 0.0, None))
    has_pc1 = bool(sig.size and sig[0] > 0)
    beta_b = scale * U[:, 0] / sig[0] if has_pc1 else np.zeros(T)
    a = G @ beta_b
    diag = np.clip(np.diag(G), 0.0, None)
    r = np.sqrt(np.clip(diag - a**2, 0.0, None))

    dt = np.diff(np.concatenate([[np.nan if anchor_step is None else float(anchor_step)], steps_arr.astype(np.float64)]))
    da = np.diff(np.concatenate([[0.0], a]))
    dr = np.diff(np.concatenate([[0.0], r]))
    du = consecutive_norms(G)
    speed_res = np.sqrt(np.clip(du**2 - da**2, 0.0, None))

    a_rn = r_rn = None
    cos_rn = None
    if not normalize_rows:
        Gn, sn = normalized_gram(G)
        beta_n = _signed_pc1(Gn, sn, G)
        if beta_n is not None:
            a_rn = G @ beta_n
            r_rn = np.sqrt(np.clip(diag - a_rn**2, 0.0, None))
            cos_rn = min(abs(float(beta_n @ G @ beta_b)), 1.0) if has_pc1 else math.nan

    W = int(window)
    n_win = max(T - W + 1, 0)
    rot = _rotation(G, window_coefficients(Ga, scale, W)) if W >= 1 else np.zeros(0)
    local = _rotation(G, local_window_coefficients(G, W)) if W >= 2 else np.zeros(0)
    starts = steps_arr[: max(n_win - 1, 0)]

    sw = _switch_dynamics(G, steps_arr, anchor_step, sig, U, scale, a, beta_b, switches) if switches else ()
    return BackboneDynamics(
        normalize_rows=normalize_rows, window=W, window_start_step=starts, window_rotation=rot,
        local_window_rotation=local, a_param=a, r_norm_param=r,
        speed_a=da / dt, speed_r_norm=dr / dt, speed_residual=speed_res / dt,
        loglog_a=power_law_fit(steps_arr, a, anchor_step, fit_range),
        loglog_r_norm=power_law_fit(steps_arr, r, anchor_step, fit_range), fit_range=fit_range,
        a_rownorm=a_rn, r_norm_rownorm=r_rn, rownorm_backbone_cos=cos_rn, switches=sw,
    )


def _switch_dynamics(G, steps, anchor_step, sig, U, scale, a, beta_b, pairs) -> tuple[SwitchDynamics, ...]:
    index = {int(s): i + 1 for i, s in enumerate(steps)}
    if anchor_step is not None:
        index.setdefault(int(anchor_step), 0)
    E = pad_anchor(G)
    K = int(np.sum(sig**2 > RANK_TOL * sig[0] ** 2)) if sig.size and sig[0] > 0 else 0
    B = (U[:, :K] * scale[:, None]) / sig[:K] if K else np.zeros((G.shape[0], 0))  # columns beta_k
    out = []
    for peak, trough in pairs:
        p, q = index[int(peak)], index[int(trough)]
        norm = math.sqrt(max(E[p, p] - 2 * E[p, q] + E[q, q], 0.0))
        T = G.shape[0]
        if norm == 0 or K == 0:
            nan = np.full(T, np.nan)
            out.append(SwitchDynamics(int(peak), int(trough), nan, nan, np.full(max(K - 1, 0), np.nan),
                                      np.full(max(K - 1, 0), np.nan)))
            continue
        dx = (E[1:, p] - E[1:, q]) / norm  # <x(t), v_sw>
        c = dx @ B  # <v_sw, V_k>, k = 1..K
        c1 = float(dx @ beta_b)
        cap = np.cumsum(c[1:] ** 2)
        perp = cap / (1 - c1**2) if (1 - c1**2) > 1e-15 else np.full_like(cap, np.nan)
        out.append(SwitchDynamics(int(peak), int(trough), dx - a * c1, dx, cap, perp))
    return tuple(out)
