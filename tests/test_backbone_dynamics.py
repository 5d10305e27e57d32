"""Backbone dynamics (rotations, speeds, power laws, switch projections, row-normalised a(t)) against brute force:
numpy SVDs and projections of an explicitly stacked drift matrix X, never the Gram formulas under test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_backbone import D_MODEL, LAYERS, STEPS, W, run  # noqa: F401  (the module-scoped run fixture)
from test_gram import reference_parts, stacked

from ckptaudit.analyses.backbone.dynamics import power_law_fit
from ckptaudit.analyses.backbone.metrics import backbone_from_gram
from ckptaudit.analyses.backbone.run import run_backbone


def pc1(M: np.ndarray) -> np.ndarray:
    return np.linalg.svd(M, full_matrices=False)[2][0]


def unit_rows(M: np.ndarray) -> np.ndarray:
    return M / np.linalg.norm(M, axis=1, keepdims=True)


def brute_dynamics(X, steps, anchor, window, switches=(), normalize=False, fit_range=None):
    """Everything from explicit vectors: SVD of (unit) rows, v_b signed by a(last) > 0, raw projections."""
    Xa = unit_rows(X) if normalize else X
    _, S, Vt = np.linalg.svd(Xa, full_matrices=False)
    vb = Vt[0] * (1 if X[-1] @ Vt[0] > 0 else -1)
    a = X @ vb
    R = X - np.outer(a, vb)  # residual vectors r(t)
    r = np.linalg.norm(R, axis=1)
    t_prev = np.array([anchor, *steps[:-1]], dtype=float)
    dt = np.asarray(steps, dtype=float) - t_prev
    a_prev, r_prev = np.concatenate([[0.0], a[:-1]]), np.concatenate([[0.0], r[:-1]])
    R_prev = np.vstack([np.zeros(X.shape[1]), R[:-1]])
    out = {"a": a, "r": r, "speed_a": (a - a_prev) / dt, "speed_r": (r - r_prev) / dt,
           "speed_res": np.linalg.norm(R - R_prev, axis=1) / dt}
    wins = [pc1(Xa[w : w + window]) for w in range(len(X) - window + 1)]
    out["rot"] = np.array([abs(wins[w] @ wins[w + 1]) for w in range(len(wins) - 1)])
    # the paper's code: W checkpoints, drift relative to the window's first, unit rows
    loc = [pc1(unit_rows(X[w + 1 : w + window] - X[w])) for w in range(len(X) - window + 1)]
    out["local"] = np.array([abs(loc[w] @ loc[w + 1]) for w in range(len(loc) - 1)])
    if not normalize:
        vn = pc1(unit_rows(X))
        vn = vn * (1 if X[-1] @ vn > 0 else -1)
        out["a_rn"] = X @ vn
        out["r_rn"] = np.linalg.norm(X - np.outer(X @ vn, vn), axis=1)
        out["cos_rn"] = abs(vn @ vb)
    tau = np.asarray(steps, dtype=float) - anchor
    keep = np.ones(len(steps), bool) if fit_range is None else (np.asarray(steps) >= fit_range[0]) & (np.asarray(steps) <= fit_range[1])
    out["slope_a"] = np.polyfit(np.log10(tau[keep]), np.log10(np.abs(a[keep])), 1)[0]
    out["slope_r"] = np.polyfit(np.log10(tau[keep]), np.log10(r[keep]), 1)[0]
    rank = int(np.sum(S**2 > 1e-12 * S[0] ** 2))
    V = np.vstack([vb, Vt[1:rank]])
    rows = {s: X[i] for i, s in enumerate(steps)}
    rows[anchor] = np.zeros(X.shape[1])
    out["sw"] = []
    for p, q in switches:
        v = rows[p] - rows[q]
        v /= np.linalg.norm(v)
        c = V @ v
        perp = v - c[0] * vb
        perp /= np.linalg.norm(perp)
        out["sw"].append({
            "res": R @ v, "drift": X @ v,
            "cap": np.array([np.sum((V[1:k] @ v) ** 2) for k in range(2, rank + 1)]),
            "perp": np.array([np.sum((V[1:k] @ perp) ** 2) for k in range(2, rank + 1)]),
        })
    return out


def close(got, want, tol=1e-7):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(initial=0.0), 1e-300))


def check(res, ref, normalize=False):
    d = res.dynamics
    close(d.a_param, ref["a"])
    close(d.r_norm_param, ref["r"])
    close(d.speed_a, ref["speed_a"])
    close(d.speed_r_norm, ref["speed_r"])
    close(d.speed_residual, ref["speed_res"], 1e-6)
    close(d.window_rotation, ref["rot"], 1e-6)
    close(d.local_window_rotation, ref["local"], 1e-6)
    assert d.loglog_a.slope == pytest.approx(ref["slope_a"], rel=1e-9)
    assert d.loglog_r_norm.slope == pytest.approx(ref["slope_r"], rel=1e-9)
    if not normalize:
        close(d.a_rownorm, ref["a_rn"])
        close(d.r_norm_rownorm, ref["r_rn"])
        assert d.rownorm_backbone_cos == pytest.approx(ref["cos_rn"], rel=1e-7)
    assert len(d.switches) == len(ref["sw"])
    for got, want in zip(d.switches, ref["sw"], strict=True):
        close(got.residual_projection, want["res"], 1e-6)
        close(got.drift_projection, want["drift"], 1e-7)
        assert got.capture.shape == want["cap"].shape
        close(got.capture, want["cap"], 1e-6)
        close(got.capture_perp, want["perp"], 1e-6)


def drift(seed=0, T=12, D=60):
    """A trajectory with a steady drift, a slower second direction and noise (rank T)."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, T + 1, dtype=float)
    d1, d2 = rng.standard_normal(D), rng.standard_normal(D)
    return np.outer(t**0.8, d1) + np.outer(np.sin(t), d2) + 0.3 * np.cumsum(rng.standard_normal((T, D)), axis=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_gram_formulas_match_explicit_vectors(normalize):
    X = drift()
    steps = [5, 10, 20, 30, 45, 60, 70, 80, 100, 110, 130, 150]
    sw = [(30, 80), (0, 45), (150, 100)]
    for flip in (1.0, -1.0):  # eigh's sign of u_1 is arbitrary: nothing may depend on it
        res = backbone_from_gram((flip * X) @ (flip * X).T, steps, window=4, anchor_step=0, switches=sw,
                                 normalize_rows=normalize)
        check(res, brute_dynamics(flip * X, steps, 0, 4, sw, normalize), normalize)
        # E_2:6 of backbone_metrics is the perpendicular capture at k = 6
        for m, dyn in zip(res.switches, res.dynamics.switches, strict=True):
            assert dyn.capture_perp[4] == pytest.approx(m.e_2_6, rel=1e-9)


def test_fit_range_and_anchor_later_than_step_zero():
    X = drift(seed=3, T=10)
    steps = list(range(110, 210, 10))
    res = backbone_from_gram(X @ X.T, steps, window=3, anchor_step=100, fit_range=(130, 180))
    ref = brute_dynamics(X, steps, 100, 3, fit_range=(130, 180))
    fit = res.dynamics.loglog_a
    assert fit.slope == pytest.approx(ref["slope_a"], rel=1e-9)
    assert (fit.n, fit.first_step, fit.last_step, fit.excluded) == (6, 130, 180, 4)
    assert res.dynamics.loglog_r_norm.slope == pytest.approx(ref["slope_r"], rel=1e-9)


def test_power_law_fit_recovers_a_planted_exponent_with_its_standard_error():
    tau = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
    assert power_law_fit(tau, 3.0 * tau**1.5, 0).slope == pytest.approx(1.5, rel=1e-12)
    noise = np.array([0.01, -0.02, 0.015, 0.0, -0.01, 0.02, -0.015])
    fit = power_law_fit(100 + tau, 2.0 * tau**0.5 * 10**noise, 100)
    # statsmodels-free reference: the textbook OLS standard error from numpy's covariance of polyfit
    (slope, _), cov = np.polyfit(np.log10(tau), np.log10(2.0 * tau**0.5 * 10**noise), 1, cov="unscaled")
    resid = np.log10(2.0 * tau**0.5 * 10**noise) - np.polyval([slope, _], np.log10(tau))
    se = math.sqrt(cov[0, 0] * np.sum(resid**2) / (len(tau) - 2))
    assert fit.slope == pytest.approx(slope, rel=1e-12) and fit.slope_se == pytest.approx(se, rel=1e-9)
    assert power_law_fit([5, 10], [1.0, 0.0], 0) is None  # one usable point
    zero = power_law_fit([0, 10, 20, 30], [0.0, 1.0, 2.0, 4.0], 0)
    assert zero.n == 3 and zero.first_step == 10 and zero.excluded == 1  # tau = 0 is not on a log axis


def test_planted_rotation_between_two_phases():
    """Two straight phases along orthogonal directions e1, e2: windows inside a phase do not rotate (|cos| = 1). The
    re-anchored window across the seam holds the unit rows e1 and (e1 + e2)/sqrt(2), whose PC1 lies at 22.5 degrees
    from e1 and 67.5 degrees from e2: the rotation curve turns by exactly those two angles."""
    D = 20
    e1, e2 = np.eye(D)[0], np.eye(D)[1]
    X = np.array([k * e1 for k in range(1, 7)] + [6 * e1 + k * e2 for k in range(1, 7)])
    res = backbone_from_gram(X @ X.T, list(range(1, 13)), window=3, anchor_step=0)
    local = res.dynamics.local_window_rotation
    assert len(local) == 9
    np.testing.assert_allclose(local[[0, 1, 2, 5, 6, 7, 8]], 1.0, atol=1e-12)
    np.testing.assert_allclose(local[3:5], np.cos(np.radians([22.5, 67.5])), atol=1e-12)
    js = res.to_json()
    assert js["local_window_rotation_deg"][3:5] == pytest.approx([22.5, 67.5], abs=1e-6)
    assert js["local_window_rotation_deg"][0] == pytest.approx(0.0, abs=1e-6)


def test_run_backbone_reports_dynamics_for_every_group(run, tmp_path):  # noqa: F811
    sw = [(60, 85), (0, 35)]
    rep = run_backbone(run, window=W, switches=sw, normalize_rows=True, fit_range=(20, 170))
    parts = reference_parts(D_MODEL, LAYERS)
    steps = STEPS[1:]
    for name, res, nres in (("trunk", rep.trunk, rep.normalized["trunk"]),
                            ("block_1", rep.blocks[1], rep.normalized["blocks"][1]),
                            ("group_G", rep.groups["G"], rep.normalized["groups"]["G"])):
        X = stacked(run, parts[name])
        check(res, brute_dynamics(X, steps, 0, W, sw, fit_range=(20, 170)))
        check(nres, brute_dynamics(X, steps, 0, W, sw, normalize=True, fit_range=(20, 170)), normalize=True)
    js = rep.to_json()
    json.dumps(js, allow_nan=False)
    t = js["trunk"]
    assert len(t["window_rotation"]) == len(t["window_alignment"]) - 1 == len(t["window_rotation_start_step"])
    assert t["window_rotation_start_step"] == steps[: len(t["window_rotation"])]
    assert t["loglog_a"]["first_step"] == 20 and t["loglog_a"]["last_step"] == 170
    assert js["settings"]["fit_range"] == [20, 170] and "fit_rule" in js["settings"]
    assert js["normalized"]["trunk"]["a_param"] == pytest.approx(t["a_rownorm"], rel=1e-9)
    s0 = js["switch"][0]
    assert len(s0["residual_projection"]) == len(steps) and len(s0["capture_pc2_to_k"]) == s0["n_pcs"] - 1
    assert "residual_projection" in s0["blocks"]["0"] and "capture_perp_pc2_to_k" in s0["groups"]["S"]


def test_backbone_cli_reports_dynamics_in_json_hdf5_terminal_and_plots(tiny_run, tmp_path):
    """Through the CLI on a real Trainer run: the HDF5 report holds the JSON's dynamics, the terminal names which
    window quantity is which, --plot writes the rotation / raw-vs-row-normalised / log-log figures, and a
    malformed --fit-range is one line and exit 2."""
    import h5py
    from cli_helpers import invoke

    out, figs = tmp_path / "b.h5", tmp_path / "figs"
    r = invoke("backbone", tiny_run, "--json", "--out", out, "--plot", figs, "--window", "3", "--switch", "20:40",
               "--fit-range", "20:60", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    t = doc["trunk"]
    assert t["loglog_a"]["first_step"] == 20 and t["loglog_a"]["n"] == 5
    with h5py.File(out) as f:
        g = f["backbone/trunk"]
        np.testing.assert_allclose(g["window_rotation"][()], t["window_rotation"], rtol=1e-12)
        np.testing.assert_allclose(g["speed_a"][()], t["speed_a"], rtol=1e-12)
        np.testing.assert_allclose(g["a_rownorm"][()], t["a_rownorm"], rtol=1e-12)
        assert g["loglog_a"].attrs["slope"] == pytest.approx(t["loglog_a"]["slope"], rel=1e-12)
        np.testing.assert_allclose(f["backbone/switch/0/residual_projection"][()],
                                   doc["switch"][0]["residual_projection"], rtol=1e-12)
        np.testing.assert_allclose(f["backbone/switch/0/blocks/1/capture_perp_pc2_to_k"][()],
                                   doc["switch"][0]["blocks"]["1"]["capture_perp_pc2_to_k"], rtol=1e-12)
    names = {p.name for p in figs.iterdir()}
    assert {"backbone_window_rotation.png", "backbone_a_raw_rownorm.png", "backbone_loglog.png"} <= names
    human = invoke("backbone", tiny_run, "--window", "3", "--switch", "20:40", "--no-report", "--device", "cpu")
    assert human.exit_code == 0, human.output
    for words in ("global backbone", "PC1 of window w+1", "row-norm backbone", "captured by PC2..PCk", "<r(t), v_sw>"):
        assert words in human.stdout, words
    for bad in ("60:20", "a:b", "10"):
        r = invoke("backbone", tiny_run, "--fit-range", bad, "--no-report")
        assert r.exit_code == 2 and "--fit-range" in r.stderr and "Traceback" not in r.stderr


def test_more_rows_than_the_dense_limit_use_lanczos_and_still_match_the_svd():
    from ckptaudit.analyses.backbone import dynamics as backbone_dynamics

    T = backbone_dynamics.DENSE_MAX + 26
    X = drift(seed=9, T=T, D=150)
    steps = list(range(10, 10 * T + 1, 10))
    res = backbone_from_gram(X @ X.T, steps, window=5, anchor_step=0, switches=[(200, 700)])
    check(res, brute_dynamics(X, steps, 0, 5, [(200, 700)]))
