"""extrapolate's landscape probe, K-consecutive-stable gate, moment storage precision and acceptance-rate
uncertainty against independent references: losses of transformers-loaded GPT-2s given numpy-built weights, finite
differences computed here, a count made here on a constructed regime sequence, torch's own rounding of the live
AdamW moments, scipy's Wilson interval and a bootstrap recomputed here."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import invoke
from test_extrapolate import _adamw_checkpoint, _collect, _hand_loss, _stored

from ckptaudit.analyses.extrapolate.landscape import FRACTIONS, summarise
from ckptaudit.analyses.extrapolate.moments import moment_rounding
from ckptaudit.analyses.extrapolate.predictors import PredictionPlan
from ckptaudit.analyses.extrapolate.stats import (
    RateBootstrap,
    rate_uncertainty,
    stable_runs,
    trusted,
    wilson_interval,
)
from ckptaudit.io.optimizer import load_optimizer_state

STEPS = (30, 40, 50, 60)


@pytest.fixture(scope="module")
def probed(tiny_run, tmp_path_factory):
    """`extrapolate --landscape --confirm-stable 1` on checkpoints 30..60 of the tiny run (linear, K = 10)."""
    out = tmp_path_factory.mktemp("probe") / "x.h5"
    args = ["extrapolate", str(tiny_run), "--steps", "30:60", "--K", "10", "--predictor", "linear", "--landscape",
            "--confirm-stable", "1", "--bootstrap", "50", "--seed", "4", "--json", "--device", "cpu", "--out", str(out),
            "--plot", str(out.parent / "figures")]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), out


@pytest.mark.slow
def test_landscape_losses_equal_direct_evaluations_and_finite_differences(probed, tiny_run):
    """L(f) of every probe equals the loss of a transformers GPT-2 given theta_t + f delta, delta = theta_hat -
    theta_t = theta_t - theta_{t-10} built with numpy; derivative and curvatures are the finite differences of those
    hand losses over h = ||delta||; the reading follows from them."""
    s, out = probed
    theta = {t: _stored(tiny_run / f"checkpoint-{t}") for t in STEPS}
    rows = [r for r in s["results"] if r.get("landscape")]
    assert sorted(r["step"] for r in rows) == [40, 50, 60]
    for r in rows:
        t = r["step"]
        delta = {k: theta[t][k] - theta[t - 10][k] for k in theta[t]}
        h = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
        hand = [_hand_loss(tiny_run / f"checkpoint-{t}", {k: theta[t][k] + f * delta[k] for k in delta}) for f in FRACTIONS]
        L0 = _hand_loss(tiny_run / f"checkpoint-{t}", theta[t])
        land = r["landscape"]
        assert land["fractions"] == list(FRACTIONS)
        assert land["losses"] == pytest.approx(hand, rel=1e-6)
        assert land["loss_at_0"] == pytest.approx(L0, rel=1e-6)
        assert land["norm"] == pytest.approx(h, rel=1e-9)
        L = dict(zip(FRACTIONS, hand, strict=True)) | {0.0: L0}
        assert land["derivative"] == pytest.approx((L[0.25] - L[0.0]) / (0.25 * h), rel=1e-3, abs=1e-7)
        assert land["curvature"] == pytest.approx((L[0.0] - 2 * L[0.5] + L[1.0]) / (0.5 * h) ** 2, rel=1e-3, abs=1e-5)
        assert land["curvature_at_prediction"] == pytest.approx((L[0.5] - 2 * L[1.0] + L[1.5]) / (0.5 * h) ** 2,
                                                                rel=1e-3, abs=1e-5)
        assert land["secant_slope"] == pytest.approx((L[1.0] - L[0.0]) / h, rel=1e-3, abs=1e-7)
        best = min(sorted(L), key=lambda f: L[f])
        assert land["best_fraction"] == best
        expected = ("uphill" if L[0.25] >= L[0.0] else "overshoot" if best < 1 else
                    "on target" if best == 1 else "undershoot")
        assert land["reading"] == expected
        assert land["losses"][FRACTIONS.index(1.0)] == pytest.approx(r["loss_pred"], rel=1e-6)  # f = 1 is the prediction
    assert s["landscape"]["evaluations"] == 5 * len(rows)
    rejected = sum(not r["strict"] for r in rows)
    assert sum(sum(v.values()) for v in s["landscape"]["rejected_readings"]["linear"].values()) == rejected
    with h5py.File(out) as f:
        g = f["extrapolate/landscape/results"]
        assert g["losses"].shape == (3, len(FRACTIONS))
        np.testing.assert_allclose(g["losses"][()], [r["landscape"]["losses"] for r in rows])


def test_summarise_on_a_planted_parabola():
    """L(s) = 2 - 0.3 s + 0.05 s^2 along a step of length h = 4: the curvature stencils are exact on a parabola
    (0.1), the secant is (L(4) - L(0)) / 4, the line minimum is s = 3 (f = 0.75), so the full step overshoots."""
    h = 4.0

    def L(f: float) -> float:
        x = f * h
        return 2 - 0.3 * x + 0.05 * x * x

    p = summarise(FRACTIONS, [L(f) for f in FRACTIONS], L(0.0), h)
    assert p.curvature == pytest.approx(0.1, rel=1e-12)
    assert p.curvature_at_prediction == pytest.approx(0.1, rel=1e-12)
    assert p.secant_slope == pytest.approx((L(1.0) - L(0.0)) / h)
    assert p.derivative == pytest.approx((L(0.25) - L(0.0)) / 1.0)
    assert p.best_fraction == 0.5 and p.reading == "overshoot"
    zero = summarise(FRACTIONS, [2.0] * 5, 2.0, 0.0)
    assert zero.reading == "no step" and math.isnan(zero.derivative)


def _count_runs(regimes: list[str]) -> list[int]:
    """The stable run at each position, counted backwards from it (a different walk from the code's)."""
    out = []
    for i in range(len(regimes)):
        n = 0
        while i - n >= 0 and regimes[i - n] == "stable":
            n += 1
        out.append(n)
    return out


def test_consecutive_stable_gate_equals_a_hand_count():
    seq = ["unknown", "stable", "stable", "transition", "stable", "stable", "stable", "chaotic", "stable", "stable"]
    assert stable_runs(seq) == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]  # planted
    assert stable_runs(seq) == _count_runs(seq)
    for k in (1, 2, 3, 4):
        assert trusted(seq, k) == [n >= k for n in _count_runs(seq)]
    assert [i for i, ok in enumerate(trusted(seq, 2)) if ok] == [2, 5, 6, 9]
    rng = np.random.default_rng(3)
    for _ in range(20):
        seq = list(rng.choice(["stable", "transition", "chaotic", "unknown"], size=30, p=[0.6, 0.2, 0.1, 0.1]))
        assert stable_runs(seq) == _count_runs(seq)


@pytest.mark.slow
def test_gate_in_the_report_follows_the_reported_regimes(probed):
    s, _ = probed
    runs = _count_runs(s["regimes"]["regime"])
    assert s["stable_run"] == runs
    at = dict(zip(s["regimes"]["steps"], runs, strict=True))
    for r in s["results"]:
        assert r["stable_run"] == at[r["step"]]
        assert r["trusted"] == (at[r["step"]] >= 1)
    ok = [r for r in s["results"] if r["trusted"]]
    gate = s["gate"]
    assert gate["K"] == 1 and gate["trusted_steps"] == sorted({r["step"] for r in ok})
    assert ok  # 3 similarities under adaptive 30/70 thresholds: one of them is stable
    assert gate["acceptance"]["linear"]["10"]["strict"] == pytest.approx(np.mean([r["strict"] for r in ok]))
    rows = [r for r in s["results"] if r["predictor"] == "linear" and r["K"] == 10]
    assert gate["applied"]["linear"]["10"]["strict"] == pytest.approx(np.mean([r["trusted"] and r["strict"] for r in rows]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lower_precision_moments_equal_torch_rounding_of_the_live_moments(tmp_path, dtype):
    """momentum and adam-step with --moment-dtype: the paper's formula and AdamW's update written out here with the
    live optimizer's float32 moments rounded by torch itself (Tensor.to); float32 storage changes nothing."""
    model, opt, ckpt = _adamw_checkpoint(tmp_path)
    state = load_optimizer_state(ckpt)
    k, eps = 10, 1e-8
    mom, _ = _collect(PredictionPlan("momentum", ckpt, k, optimizer=state, moment_dtype=dtype))
    adam, _ = _collect(PredictionPlan("adam-step", ckpt, k, optimizer=state, moment_dtype=dtype))
    group = opt.param_groups
    moved = 0.0
    for name, p in model.named_parameters():
        st = opt.state[p]
        m, v = st["exp_avg"].to(dtype).double(), st["exp_avg_sq"].to(dtype).double()
        theta = p.detach().double()
        torch.testing.assert_close(mom[name], theta + k * m / torch.sqrt(v + eps), rtol=1e-12, atol=1e-12)
        hyper = next(g for g in group if any(q is p for q in g["params"]))
        b1, b2 = hyper["betas"]
        step = float(st["step"])
        lr, wd = hyper["lr"], hyper["weight_decay"]
        update = (m / (1 - b1**step)) / (v.sqrt() / math.sqrt(1 - b2**step) + hyper["eps"])
        torch.testing.assert_close(adam[name], theta * (1 - k * lr * wd) - k * lr * update, rtol=1e-10, atol=1e-12)
        full = st["exp_avg"].double() / torch.sqrt(st["exp_avg_sq"].double() + eps)
        moved = max(moved, float((mom[name] - (theta + k * full)).abs().max()))
    assert moved > 0  # the rounding is visible in the prediction
    same, _ = _collect(PredictionPlan("momentum", ckpt, k, optimizer=state, moment_dtype=torch.float32))
    plain, _ = _collect(PredictionPlan("momentum", ckpt, k, optimizer=state))
    for name in plain:
        assert torch.equal(same[name], plain[name])


def test_moment_rounding_summary_by_hand(tmp_path):
    model, opt, ckpt = _adamw_checkpoint(tmp_path)
    got = moment_rounding(load_optimizer_state(ckpt), torch.float16)
    n = m_nz = v_nz = m_fl = v_fl = 0
    num = den = 0.0
    for p in model.parameters():
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        mr, vr = m.to(torch.float16).float(), v.to(torch.float16).float()
        n += m.numel()
        m_nz, v_nz = m_nz + int((m != 0).sum()), v_nz + int((v != 0).sum())
        m_fl, v_fl = m_fl + int(((m != 0) & (mr == 0)).sum()), v_fl + int(((v != 0) & (vr == 0)).sum())
        u = m.double() / torch.sqrt(v.double() + 1e-8)
        ur = mr.double() / torch.sqrt(vr.double() + 1e-8)
        num += float(((ur - u) ** 2).sum())
        den += float((u**2).sum())
    assert got["entries"] == n and got["dtype"] == "float16" and got["nonfinite"] == 0
    assert got["m_flushed"] == pytest.approx(m_fl / m_nz) and got["v_flushed"] == pytest.approx(v_fl / v_nz)
    assert got["momentum_rel_change"] == pytest.approx(math.sqrt(num / den), rel=1e-9)


def test_moment_dtype_cli_reports_the_rounding_and_rejects_unknown_names(tiny_run):
    res = invoke("extrapolate", str(tiny_run), "--steps", "50:60", "--K", "5", "--predictor",
                 "momentum", "--moment-dtype", "float16", "--json", "--no-report", "--device", "cpu")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["settings"]["moment_dtype"] == "float16"
    assert [m["step"] for m in s["moment_rounding"]] == [50, 60]
    bad = invoke("extrapolate", str(tiny_run), "--moment-dtype", "int8", "--no-report")
    assert bad.exit_code == 2 and "int8" in bad.output


class Row:
    def __init__(self, step, strict, err=None, predictor="linear", K=5):
        self.step, self.strict, self.adaptive, self.proximity = step, strict, True, False
        self.rel_weight_error, self.predictor, self.K = err, predictor, K


def test_wilson_interval_equals_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 5), (3, 7), (7, 7), (12, 40)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-12)


def test_rate_bootstrap_recomputed_by_hand_and_against_the_binomial_error():
    """Replicates recomputed here from the same multinomial counts over the starting steps (one row per step and
    two predictors sharing the draw); then the bootstrap se of a rate over many steps against sqrt(p(1-p)/n)."""
    rng = np.random.default_rng(0)
    steps = [10 * i for i in range(12)]
    rows = [Row(t, bool(rng.random() < 0.4), err=float(rng.random())) for t in steps]
    rows += [Row(t, bool(rng.random() < 0.7), predictor="adam-step") for t in steps[3:]]
    boot = RateBootstrap([r.step for r in rows], n_boot=300, seed=9)
    counts = np.random.default_rng(9).multinomial(12, np.full(12, 1 / 12), size=300)
    for pred in ("linear", "adam-step"):
        mine = [r for r in rows if r.predictor == pred]
        hand = []
        for c in counts:
            w = np.array([c[steps.index(r.step)] for r in mine], dtype=float)
            hand.append(np.sum(w * [r.strict for r in mine]) / w.sum() if w.sum() else np.nan)
        hand = np.asarray(hand)
        np.testing.assert_allclose(boot.replicates(mine, lambda r: float(r.strict)), hand, rtol=1e-12)
        u = rate_uncertainty(mine, boot)[pred]["5"]["strict"]
        ok = hand[np.isfinite(hand)]
        assert u["se"] == pytest.approx(np.std(ok, ddof=1)) and u["ci"] == pytest.approx(np.percentile(ok, [2.5, 97.5]))
    many = [Row(t, bool(rng.random() < 0.3)) for t in range(400)]
    p = np.mean([r.strict for r in many])
    se = rate_uncertainty(many, RateBootstrap([r.step for r in many], 400, 1))["linear"]["5"]["strict"]["se"]
    assert se == pytest.approx(math.sqrt(p * (1 - p) / len(many)), rel=0.15)


@pytest.mark.slow
def test_cli_acceptance_intervals_match_the_rows(probed):
    from scipy.stats import binomtest

    s, out = probed
    rows = [r for r in s["results"] if r["predictor"] == "linear" and r["K"] == 10]
    u = s["acceptance_uncertainty"]
    assert u["bootstrap"]["n_boot"] == 50 and u["bootstrap"]["seed"] == 4
    for c in ("strict", "adaptive", "proximity"):
        k = sum(r[c] for r in rows)
        ci = binomtest(k, len(rows)).proportion_ci(method="wilson")
        assert u["rates"]["linear"]["10"][c]["wilson"] == pytest.approx([ci.low, ci.high])
    with h5py.File(out) as f:
        w = f["extrapolate/acceptance_uncertainty/rates/linear/10/strict/wilson"][()]
        assert list(w) == pytest.approx(u["rates"]["linear"]["10"]["strict"]["wilson"])


@pytest.mark.slow
def test_plot_extrapolate_error_bars_are_the_wilson_intervals_of_the_rows(probed, tiny_run):
    """The acceptance figure's bars, read back from matplotlib, against scipy's Wilson interval of the rows counted
    here (all predictions, then the trusted ones); the title names the run, K ticks are the integer K values; the
    CLI wrote both PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import binomtest

    from ckptaudit.report.plots import extrapolate_acceptance_figure

    s, out = probed
    for name in ("extrapolate_acceptance.png", "extrapolate_landscape.png"):
        assert (out.parent / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = extrapolate_acceptance_figure(plt, s, "tiny-run")
    assert "tiny-run" in fig.texts[0].get_text()
    rows = [r for r in s["results"] if r["predictor"] == "linear" and r["K"] == 10]
    for ax, crit in zip(fig.axes, ("strict", "adaptive", "proximity"), strict=True):
        assert list(ax.get_xticks()) == [10] and ax.get_xlabel().startswith("K (training steps")
        expected = []
        for subset in (rows, [r for r in rows if r["trusted"]]):
            k = sum(r[crit] for r in subset)
            ci = binomtest(k, len(subset)).proportion_ci(method="wilson")
            expected += [k / len(subset), ci.low, ci.high]
        got = []
        for c in ax.containers:  # one ErrorbarContainer per series: (data line, caps, bar segments)
            (seg,) = c.lines[2][0].get_segments()
            got += [float(c.lines[0].get_ydata()[0]), float(seg[0][1]), float(seg[1][1])]
        assert got == pytest.approx(expected)
    plt.close(fig)
