"""Activation variance, loss curvature, the paper's code's probe-mean similarity and the bootstrap over probes of
s_t, each against a brute-force computation (explicit windows, explicit resampled fingerprints, planted curves), and
`ckptaudit regimes` end to end on a real run written by the project's trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli_helpers import invoke

from ckptaudit.analyses.regimes.run import RegimesResult
from ckptaudit.analyses.regimes.signals import (
    RegimeSignals,
    SignalCollector,
    loss_curvature,
    losses_from_log_history,
    similarity_bootstrap,
)


def reps(T=7, n=9, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    return [base + 0.3 * k * torch.randn(n, d, generator=g, dtype=torch.float64) for k in range(T)]


def collect(rs, window):
    c = SignalCollector(window)
    prev = None
    for r in rs:
        c(r, prev)
        prev = r
    return c


def test_activation_variance_is_the_windowed_variance_of_the_papers_code():
    rs = reps()
    c = collect(rs, window=3)
    arr = [r.numpy() for r in rs]
    assert math.isnan(c.variance[0])
    for i in range(1, len(rs)):
        win = np.stack(arr[max(0, i - 2) : i + 1])  # the code: snapshots[max(0, i - window + 1) : i + 1]
        assert c.variance[i] == pytest.approx(float(win.var(axis=0).mean()), rel=1e-12)
        per_probe = win.var(axis=0).mean(axis=1)
        assert c.variance_se[i] == pytest.approx(float(np.std(per_probe, ddof=1) / math.sqrt(len(per_probe))), rel=1e-10)


def test_probe_mean_similarity_and_concatenated_cosine_differ_as_defined():
    rs = reps(seed=1)
    c = collect(rs, window=2)
    for i in range(1, len(rs)):
        a, b = rs[i].numpy(), rs[i - 1].numpy()
        per = [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b, strict=True)]
        assert c.probe_mean_similarity()[i] == pytest.approx(np.mean(per), rel=1e-12)


def test_loss_curvature_of_planted_parabolas():
    steps = [0, 10, 30, 35, 60, 100]
    L = [3.0 - 0.01 * t + 2e-4 * t**2 for t in steps]
    d2, dd = loss_curvature(steps, L)
    assert np.isnan(d2[:2]).all() and np.isnan(dd[:2]).all()
    np.testing.assert_allclose(dd[2:], 4e-4, rtol=1e-9)  # the second derivative of the parabola, any spacing
    np.testing.assert_allclose(d2[2:], [L[i] - 2 * L[i - 1] + L[i - 2] for i in range(2, 6)], rtol=1e-12)
    even = [0, 50, 100, 150]
    d2e, dde = loss_curvature(even, [2e-4 * t**2 for t in even])
    np.testing.assert_allclose(d2e[2:], 4e-4 * 50**2, rtol=1e-12)
    np.testing.assert_allclose(dde[2:], d2e[2:] / 50**2, rtol=1e-12)


def test_bootstrap_matches_explicitly_resampled_fingerprints():
    """The same seeded draws, applied by repeating probe rows and taking the cosine of the concatenated
    fingerprints in numpy; thresholds and regimes per replicate by numpy's percentiles."""
    rs = reps(T=6, n=8, seed=2)
    c = collect(rs, window=2)
    steps = list(range(0, 60, 10))
    sim = [math.nan] + [float(np.dot(a.numpy().ravel(), b.numpy().ravel())
                              / (np.linalg.norm(a.numpy()) * np.linalg.norm(b.numpy()))) for a, b in zip(rs[1:], rs[:-1])]
    res = RegimesResult.from_similarity(steps, sim, None)
    B, seed = 50, 7
    got = similarity_bootstrap(c, res.regime, None, (30, 70), n_boot=B, seed=seed)
    counts = np.random.default_rng(seed).multinomial(8, np.full(8, 1 / 8), size=B)
    S = np.full((B, 6), np.nan)
    for b in range(B):
        idx = np.repeat(np.arange(8), counts[b])
        for i in range(1, 6):
            x, y = rs[i].numpy()[idx].ravel(), rs[i - 1].numpy()[idx].ravel()
            S[b, i] = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    np.testing.assert_allclose(got["similarity_se"][1:], S[:, 1:].std(axis=0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(got["similarity_ci_low"][1:], np.percentile(S[:, 1:], 2.5, axis=0), rtol=1e-9)
    np.testing.assert_allclose(got["similarity_ci_high"][1:], np.percentile(S[:, 1:], 97.5, axis=0), rtol=1e-9)
    th = np.percentile(S[:, 1:], [30, 70], axis=1)  # [2, B]
    lab = np.where(S[:, 1:] > th[1][:, None], "stable", np.where(S[:, 1:] < th[0][:, None], "chaotic", "transition"))
    want = (lab == np.array(res.regime[1:])[None, :]).mean(axis=0)
    np.testing.assert_allclose(got["regime_agreement"][1:], want, rtol=1e-12)
    assert np.isnan(got["regime_agreement"][0])
    assert got["thresholds_ci"]["low"] == pytest.approx(list(np.percentile(th[0], [2.5, 97.5])), rel=1e-9)
    again = similarity_bootstrap(c, res.regime, None, (30, 70), n_boot=B, seed=seed)
    np.testing.assert_array_equal(again["similarity_se"], got["similarity_se"])  # deterministic given the seed
    other = similarity_bootstrap(c, res.regime, None, (30, 70), n_boot=B, seed=seed + 1)
    assert not np.allclose(other["similarity_se"][1:], got["similarity_se"][1:])
    assert similarity_bootstrap(c, res.regime, None, (30, 70), n_boot=0) is None


def test_bootstrap_of_probes_that_all_move_alike_has_no_spread():
    """Every probe is the same vector times its own scale: each resample gives the same cosine, se 0, agreement 1."""
    g = torch.Generator().manual_seed(3)
    scales = torch.rand(10, 1, generator=g, dtype=torch.float64) + 0.5
    path = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(5)]
    rs = [scales * p for p in path]
    c = collect(rs, window=2)
    sim = [math.nan, *(float(p @ q / (p.norm() * q.norm())) for p, q in zip(path[1:], path[:-1], strict=True))]
    res = RegimesResult.from_similarity(range(5), sim, (0.0, 0.5))
    got = similarity_bootstrap(c, res.regime, (0.0, 0.5), (30, 70), n_boot=40, seed=0)
    np.testing.assert_allclose(got["similarity_se"][1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(got["similarity_ci_low"][1:], sim[1:], rtol=1e-12)
    assert np.all(np.asarray(got["regime_agreement"][1:]) == 1.0) and "thresholds_ci" not in got


def test_losses_from_log_history_and_json_keys():
    hist = [{"step": 0, "eval_loss": 3.0}, {"step": 5, "loss": 2.9}, {"step": 10, "eval_loss": 2.5},
            {"step": 10, "eval_loss": 2.4}, {"step": 20, "eval_loss": float("nan")}]
    assert losses_from_log_history(hist, [0, 10, 20]) == [3.0, 2.4, None]
    rs = reps(T=4)
    sig = RegimeSignals.build([0, 1, 2, 3], collect(rs, 2), ["unknown", "chaotic", "stable", "transition"], None,
                              (30, 70), [3.0, 2.5, None, 2.0], "test", n_boot=10)
    j = sig.to_json()
    json.dumps(j, allow_nan=False)
    assert j["loss"] == [3.0, 2.5, None, 2.0] and j["loss_curvature"] == [None, None, None, None]


def test_regimes_cli_reports_variance_curvature_and_bootstrap(tiny_run, tmp_path):
    """On the real fixture run: the evaluated validation loss equals the eval_loss the trainer logged at each
    checkpoint (two independent code paths), the curvature is its second difference, the activation variance at the
    last checkpoint is numpy's over fingerprints recomputed with transformers' own loader, and JSON and HDF5 agree."""
    import h5py
    from transformers import GPT2LMHeadModel

    from ckptaudit.analyses.regimes.run import build_probes
    from ckptaudit.tasks import task_from_checkpoint_dir

    out = tmp_path / "r.h5"
    r = invoke("regimes", tiny_run, "--json", "--out", out, "--device", "cpu", "--variance-window", "3",
               "--bootstrap", "30")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    logged = json.loads((tiny_run / "checkpoint-60" / "trainer_state.json").read_text())["log_history"]
    want = {e["step"]: e["eval_loss"] for e in logged if "eval_loss" in e}
    assert s["loss"] == pytest.approx([want[t] for t in s["steps"]], rel=1e-6)
    assert "validation loss" in s["loss_source"]
    L = s["loss"]
    assert s["loss_curvature"][2:] == pytest.approx([L[i] - 2 * L[i - 1] + L[i - 2] for i in range(2, len(L))], rel=1e-9)
    probes = build_probes(tiny_run / "checkpoint-0", None, None, task_from_checkpoint_dir(tiny_run / "checkpoint-0"))
    fp = []
    for step in (40, 50, 60):
        m = GPT2LMHeadModel.from_pretrained(tiny_run / f"checkpoint-{step}").eval()
        with torch.no_grad():
            fp.append(m(input_ids=probes.input_ids, output_hidden_states=True).hidden_states[-1].double().mean(1).numpy())
    assert s["activation_variance"][-1] == pytest.approx(float(np.stack(fp).var(axis=0).mean()), rel=1e-5)
    boot = s["bootstrap"]
    assert boot["n_boot"] == 30 and len(boot["similarity_se"]) == len(s["steps"]) and boot["similarity_se"][0] is None
    with h5py.File(out) as f:
        g = f["regimes"]
        np.testing.assert_allclose(g["activation_variance"][1:], s["activation_variance"][1:], rtol=1e-12)
        np.testing.assert_allclose(g["loss_curvature"][2:], s["loss_curvature"][2:], rtol=1e-12)
        np.testing.assert_allclose(g["bootstrap/similarity_se"][1:], boot["similarity_se"][1:], rtol=1e-12)
        assert g.attrs["loss_source"] == s["loss_source"]
    bare = invoke("regimes", tiny_run, "--json", "--no-report", "--device", "cpu", "--no-loss", "--bootstrap", "0")
    assert bare.exit_code == 0, bare.output
    b = json.loads(bare.stdout)
    assert b["loss"] is None and b["loss_curvature"] is None and "--no-loss" in b["loss_source"]
    assert b["bootstrap"] is None and b["similarity"][1:] == pytest.approx(s["similarity"][1:], rel=1e-12)
    human = invoke("regimes", tiny_run, "--no-report", "--device", "cpu", "--bootstrap", "20")
    assert human.exit_code == 0, human.output
    assert "bootstrap over probes" in human.stdout and "act. var" in human.stdout
