"""Sampling uncertainty of classify-embeddings: the counts-based bootstrap against explicitly resampled values run
through numpy and scipy.stats.kstest, the reported errors against the real spread over seeds, and the CLI."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import invoke
from scipy import stats as sps
from test_embeddings_cli import minilm_dir

from ckptaudit.analyses.embeddings.run import QUANTILE_LEVELS, overlap_stats
from ckptaudit.analyses.embeddings.uncertainty import ks_of_sample, sampled_uncertainty


def _reference_stats(v: np.ndarray) -> dict:
    """The analysis' statistics of a sample of s values, by numpy and scipy directly."""
    m, sd = float(v.mean()), float(v.std())
    return {"mean_c2": m, "std_c2": sd, "quantiles_c2": np.quantile(v, QUANTILE_LEVELS),
            "frac_abs_c_gt_0_3": float(np.mean(v > 0.09)), "frac_abs_c_gt_0_5": float(np.mean(v > 0.25)),
            "ks_gauss": float(sps.kstest(v, sps.norm(m, sd).cdf).statistic),
            "ks_exp": float(sps.kstest(v, sps.expon(0.0, m).cdf).statistic)}


def test_counts_path_ks_equals_scipy_kstest():
    rng = np.random.default_rng(0)
    for s in (rng.standard_normal(3000) ** 2 * 0.01, rng.exponential(0.02, 2000), np.repeat(rng.random(50), 7) ** 2):
        g, e = ks_of_sample(s)
        assert g == pytest.approx(sps.kstest(s, sps.norm(s.mean(), s.std()).cdf).statistic, abs=1e-12)
        assert e == pytest.approx(sps.kstest(s, sps.expon(0.0, s.mean()).cdf).statistic, abs=1e-12)


def test_bootstrap_equals_explicit_resampling():
    """The same seeded integer draws index the sorted sample; every replicate is rebuilt as an array and measured
    with numpy / scipy, then summarised."""
    rng = np.random.default_rng(5)
    c = np.tanh(rng.standard_normal(1500) * 0.2)
    B, seed = 40, 11
    got = sampled_uncertainty(c, "A", QUANTILE_LEVELS, n_boot=B, seed=seed)
    srt = np.sort(c * c)
    draws = np.random.default_rng(seed)
    reps = [_reference_stats(srt[draws.integers(0, srt.size, srt.size)]) for _ in range(B)]
    boot = got["bootstrap"]
    for key in ("mean_c2", "std_c2", "frac_abs_c_gt_0_3", "frac_abs_c_gt_0_5", "ks_gauss", "ks_exp"):
        v = np.array([r[key] for r in reps])
        assert boot[key]["se"] == pytest.approx(v.std(ddof=1), rel=1e-7, abs=1e-15), key
        assert boot[key]["ci"] == pytest.approx(list(np.percentile(v, [2.5, 97.5])), rel=1e-7, abs=1e-15), key
    bulk = np.array([r["ks_exp"] - r["ks_gauss"] for r in reps])
    assert boot["bulk_index"]["se"] == pytest.approx(bulk.std(ddof=1), rel=1e-7)
    q = np.array([r["quantiles_c2"] for r in reps])
    np.testing.assert_allclose(boot["quantiles_c2"]["se"], q.std(axis=0, ddof=1), rtol=1e-7, atol=1e-15)
    assert boot["class_agreement"] == pytest.approx(np.mean([r["ks_gauss"] < r["ks_exp"] for r in reps]))
    se = got["standard_error"]
    assert se["mean_c2"] == pytest.approx((c * c).std(ddof=1) / math.sqrt(c.size), rel=1e-12)
    p = np.mean(np.abs(c) > 0.3)
    assert se["frac_abs_c_gt_0_3"] == pytest.approx(math.sqrt(p * (1 - p) / c.size), rel=1e-12)


def test_reported_errors_match_the_spread_over_seeds():
    """The real sampling error: the same matrix sampled with 40 seeds. The spread of the estimates over seeds must
    agree with the standard errors reported within a single run (closed form and bootstrap)."""
    E = torch.randn(400, 12, generator=torch.Generator().manual_seed(2))
    runs = [overlap_stats(E, pairs=3000, seed=s, bootstrap=60) for s in range(40)]
    for key, se_of in (("mean_c2", lambda r: r.uncertainty["standard_error"]["mean_c2"]),
                       ("mean_c2", lambda r: r.uncertainty["bootstrap"]["mean_c2"]["se"]),
                       ("frac_abs_c_gt_0_3", lambda r: r.uncertainty["standard_error"]["frac_abs_c_gt_0_3"]),
                       ("ks_gauss", lambda r: r.uncertainty["bootstrap"]["ks_gauss"]["se"]),
                       ("bulk_index", lambda r: r.uncertainty["bootstrap"]["bulk_index"]["se"])):
        spread = float(np.std([getattr(r, key) for r in runs], ddof=1))
        reported = float(np.mean([se_of(r) for r in runs]))
        assert 0.6 < reported / spread < 1.6, (key, reported, spread)


def test_exact_mode_says_there_is_no_sampling_error():
    r = overlap_stats(torch.randn(100, 8, generator=torch.Generator().manual_seed(0)), exact=True, tile=64,
                      bootstrap=50)
    assert r.uncertainty["bootstrap"] is None and "no sampling error" in r.uncertainty["method"]
    assert overlap_stats(torch.randn(100, 8), pairs=500, bootstrap=0).uncertainty["bootstrap"] is None


def test_classify_cli_reports_uncertainty_in_json_hdf5_and_terminal(tmp_path):
    d = str(minilm_dir())
    out = tmp_path / "e.h5"
    r = invoke("classify-embeddings", d, "--pairs", "20000", "--bootstrap", "30", "--seed", "4", "--json",
               "--out", str(out))
    assert r.exit_code == 0, r.output
    u = json.loads(r.stdout)["uncertainty"]
    assert u["bootstrap"]["n_boot"] == 30 and u["bootstrap"]["seed"] == 4
    assert u["bootstrap"]["ks_gauss"]["ci"][0] <= u["bootstrap"]["ks_gauss"]["ci"][1]
    with h5py.File(out) as f:
        g = f["embeddings/embed/uncertainty"]
        assert g["standard_error"].attrs["mean_c2"] == pytest.approx(u["standard_error"]["mean_c2"], rel=1e-12)
        np.testing.assert_allclose(g["bootstrap/ks_exp/ci"][()], u["bootstrap"]["ks_exp"]["ci"], rtol=1e-12)
        assert g["bootstrap"].attrs["class_agreement"] == pytest.approx(u["bootstrap"]["class_agreement"])
    human = invoke("classify-embeddings", d, "--pairs", "5000", "--bootstrap", "20", "--no-report")
    assert human.exit_code == 0 and "class agreement" in human.stdout and "bootstrap replicates" in human.stdout
