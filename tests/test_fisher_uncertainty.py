"""fisher's signed projections, trace, random-direction spread and sampling uncertainty against independent
references: the dense empirical Fisher and dense gradients of test_fisher, Monte Carlo over uniform directions, the
spread over seeds of the K random directions, and a bootstrap recomputed from the dense resampled gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fisher import SEED, B, M, dense_gradients, tiny_fisher_model, unit

from ckptaudit.analyses.fisher.directions import random_directions
from ckptaudit.analyses.fisher.run import FisherSettings, fisher_at_model

K, N_BOOT = 5, 64


@pytest.fixture(scope="module")
def case():
    model, task, layout = tiny_fisher_model()
    rng = np.random.default_rng(0)
    dirs = {"backbone": unit(rng, layout.dim), "pc2": unit(rng, layout.dim)}
    settings = FisherSettings(batches=M, n_random=K, seed=SEED, bootstrap=N_BOOT)
    res = fisher_at_model(model, task, layout, dirs, settings, batch_size=B)
    return res, dirs, dense_gradients(model, task), layout


def test_signed_projection_trace_and_block_projections_from_dense_gradients(case):
    res, dirs, G, _ = case
    vb = dirs["backbone"].numpy()
    p = G @ vb
    gp = res.gradient_projection()
    assert gp["grad_backbone_projection_mean"] == pytest.approx(p.mean(), rel=1e-10)
    assert gp["grad_backbone_projection_std"] == pytest.approx(p.std(), rel=1e-10)
    assert gp["grad_backbone_projection_se"] == pytest.approx(p.std(ddof=1) / np.sqrt(M), rel=1e-10)
    cos = p / np.linalg.norm(G, axis=1)
    assert gp["grad_backbone_cos_signed_mean"] == pytest.approx(cos.mean(), rel=1e-10)
    assert gp["grad_backbone_cos_signed_std"] == pytest.approx(cos.std(), rel=1e-10)
    assert gp["grad_backbone_cos_se"] == pytest.approx(np.abs(cos).std(ddof=1) / np.sqrt(M), rel=1e-10)
    F = G.T @ G / M
    assert res.trace == pytest.approx(np.trace(F), rel=1e-10)
    assert res.trace == pytest.approx(np.linalg.eigvalsh(F).sum(), rel=1e-9)  # one definition: the spectrum's sum
    sq = np.sum(G * G, axis=1)
    assert res.trace_se == pytest.approx(sq.std(ddof=1) / np.sqrt(M), rel=1e-10)
    for name in ("backbone", "pc2"):
        x = (G @ dirs[name].numpy()) ** 2
        assert res.q_se()[name] == pytest.approx(x.std(ddof=1) / np.sqrt(M), rel=1e-10)
    half = G.shape[1] // 2
    bp = res.block_projection()
    for b, sl in ((0, slice(0, half)), (1, slice(half, None))):
        vl = vb[sl] / np.linalg.norm(vb[sl])
        raw = G[:, sl] @ vl
        assert bp["block_projection_mean"][b] == pytest.approx(raw.mean(), rel=1e-10)
        assert bp["block_projection_std"][b] == pytest.approx(raw.std(), rel=1e-10)
        assert bp["block_grad_norm_mean"][b] == pytest.approx(np.linalg.norm(G[:, sl], axis=1).mean(), rel=1e-10)
    np.testing.assert_allclose(res.gram, G @ G.T, rtol=1e-10)


def test_random_quotient_spread_and_its_exact_value(case):
    """q_random_std / _se from the K quotients of the dense Fisher; the exact std of q(w) against Monte Carlo over
    w uniform on the sphere orthogonal to v_b; the exact standard error of the K-mean against the spread of that mean
    over many seeds of the random directions themselves."""
    res, dirs, G, layout = case
    F = G.T @ G / M
    W = random_directions(dirs["backbone"], K, SEED).numpy()
    q = np.einsum("kd,de,ke->k", W, F, W)
    st = res.random_stats()
    assert st["q_random_std"] == pytest.approx(q.std(), rel=1e-9)
    assert st["q_random_se"] == pytest.approx(q.std(ddof=1) / np.sqrt(K), rel=1e-9)
    vb = dirs["backbone"].numpy()
    rng = np.random.default_rng(11)
    draws = []
    for _ in range(8):
        x = rng.standard_normal((10_000, layout.dim))
        x -= np.outer(x @ vb, vb)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        draws.append(np.sum((x @ G.T) ** 2, axis=1) / M)
    mc = np.concatenate(draws)
    assert mc.mean() == pytest.approx(res.random_expected, rel=0.02)
    assert st["q_random_std_exact"] == pytest.approx(mc.std(), rel=0.03)
    means = [float(np.einsum("kd,de,ke->k", w, F, w).mean())
             for w in (random_directions(dirs["backbone"], K, s).numpy() for s in range(2000))]
    assert st["q_random_se_exact"] == pytest.approx(np.std(means), rel=0.06)


@pytest.mark.slow
def test_bootstrap_over_batches_equals_dense_resampled_analysis(case):
    """Every replicate recomputed from the dense gradient matrix with rows repeated by the same multinomial counts
    (numpy default_rng(seed)): its Fisher, eigh, u_1, quotients, trace, cosines and block projections; then the
    reported standard errors and 95% percentile intervals from those replicates."""
    res, dirs, G, _ = case
    counts = np.random.default_rng(SEED).multinomial(M, np.full(M, 1.0 / M), size=N_BOOT)
    vb = dirs["backbone"].numpy()
    Wr = random_directions(dirs["backbone"], K, SEED).numpy()
    P = np.eye(G.shape[1]) - np.outer(vb, vb)
    half = G.shape[1] // 2
    ref: dict[str, list[float]] = {}
    for c in counts:
        Gb = np.repeat(G, c, axis=0)
        Fb = Gb.T @ Gb / M
        lam, vecs = np.linalg.eigh(Fb)
        lam, vecs = lam[::-1], vecs[:, ::-1]
        top = np.clip(lam[:M], 0, None)
        qb = vb @ Fb @ vb
        qr = np.einsum("kd,de,ke->k", Wr, Fb, Wr).mean()
        vals = {
            "q_backbone": qb, "q_pc2": dirs["pc2"].numpy() @ Fb @ dirs["pc2"].numpy(), "q_random_mean": qr,
            "anisotropy": qb / qr, "trace": np.trace(Fb),
            "anisotropy_exact": qb / (np.trace(P @ Fb @ P) / (G.shape[1] - 1)),
            "lambda_1": lam[0], "effective_rank": top.sum() ** 2 / (top**2).sum(),
            "top_overlap_backbone": abs(vecs[:, 0] @ vb),
            "grad_backbone_cos_mean": np.mean(np.abs(Gb @ vb) / np.linalg.norm(Gb, axis=1)),
            "grad_backbone_projection_mean": np.mean(Gb @ vb),
        }
        for b, sl in ((0, slice(0, half)), (1, slice(half, None))):
            vl = vb[sl] / np.linalg.norm(vb[sl])
            vals[f"block_signed_projection_{b}"] = np.mean(Gb[:, sl] @ vl / np.linalg.norm(Gb[:, sl], axis=1))
            vals[f"block_projection_mean_{b}"] = np.mean(Gb[:, sl] @ vl)
        for k, v in vals.items():
            ref.setdefault(k, []).append(float(v))
    boot = res.bootstrap
    assert set(boot["replicates"]) == set(ref)
    for k, v in ref.items():
        np.testing.assert_allclose(boot["replicates"][k], v, rtol=1e-7, atol=1e-14, err_msg=k)
        assert boot["se"][k] == pytest.approx(np.std(v, ddof=1), rel=1e-6), k
        assert boot["ci_low"][k] == pytest.approx(np.percentile(v, 2.5), rel=1e-6), k
        assert boot["ci_high"][k] == pytest.approx(np.percentile(v, 97.5), rel=1e-6), k
    assert boot["n_boot"] == N_BOOT and boot["seed"] == SEED and boot["level"] == 0.95
    assert "replicates" not in res.to_json()["bootstrap"]


@pytest.mark.slow
def test_bootstrap_se_tracks_the_spread_over_fresh_batches():
    """The bootstrap standard error of q(v_b) from M batches against the actual spread of q(v_b) over draws of M
    fresh batches (other seeds of the batch sampler) from a train split large enough (840 examples) that the draws
    barely overlap."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckptaudit.analyses.fisher.run import trunk_layout
    from ckptaudit.io.roles import resolve_architecture
    from ckptaudit.tasks import get_task

    task = get_task("modadd", p=41)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=task.vocab_size, n_positions=4, n_embd=4, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
    model = GPT2LMHeadModel(config).double().eval()
    arch = resolve_architecture({n: tuple(t.shape) for n, t in model.state_dict().items()}, config.to_dict())
    layout = trunk_layout(arch)
    vb = unit(np.random.default_rng(0), layout.dim)
    values, ses = [], []
    for seed in range(24):
        s = FisherSettings(batches=16, n_random=2, seed=seed, bootstrap=200)
        r = fisher_at_model(model, task, layout, {"backbone": vb}, s, batch_size=4)
        values.append(r.q["backbone"])
        ses.append(r.bootstrap["se"]["q_backbone"])
    ratio = float(np.sqrt(np.mean(np.square(ses)))) / float(np.std(values, ddof=1))
    assert 0.7 < ratio < 1.4, ratio  # the bootstrap describes the batch-to-batch spread


def test_no_bootstrap_when_disabled(case):
    model, task, layout = tiny_fisher_model()
    res, dirs, _, _ = case
    s = FisherSettings(batches=M, n_random=K, seed=SEED, bootstrap=0)
    r = fisher_at_model(model, task, layout, dirs, s, batch_size=B)
    assert r.bootstrap is None and r.to_json()["bootstrap"] is None
    assert r.q == res.q  # the bootstrap only reads the per-batch scalars
    torch.testing.assert_close(torch.from_numpy(r.gram), torch.from_numpy(res.gram))


@pytest.mark.slow
def test_cli_reports_the_new_quantities_in_json_hdf5_terminal_and_plots(tiny_run, tmp_path):
    """`fisher --switch 30:60` over both switch checkpoints: the switch-pair ratios and running sums from the JSON's
    own per-checkpoint values, <v_b, v_sw> from the vectors file and the stored weights (safetensors, numpy), the
    bootstrap replicates in the HDF5 report, the terminal tables and the figures."""
    import json

    import h5py
    from cli_helpers import invoke
    from safetensors.numpy import load_file

    vec = tmp_path / "v.safetensors"
    assert invoke("backbone", tiny_run, "--save-vectors", vec, "--no-report", "--quiet").exit_code == 0
    out, figs = tmp_path / "f.h5", tmp_path / "figs"
    common = ["fisher", tiny_run, "--steps", "30,60", "--vectors", vec, "--batches", 4, "--batch-size", 8,
              "--random", 3, "--switch", "30:60", "--bootstrap", 40, "--seed", 2]
    r = invoke(*common, "--out", out, "--json", "--no-hash", "--plot", figs)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    c30, c60 = s["checkpoints"]
    pair = s["switch_pair"]
    assert (pair["peak"], pair["trough"]) == (30, 60)
    assert pair["lambda_1"]["ratio"] == pytest.approx(c30["top_eigenvalues"][0] / c60["top_eigenvalues"][0])
    assert pair["trace"]["ratio"] == pytest.approx(c30["trace"] / c60["trace"])
    for b in ("0", "1"):
        assert s["block_projection_running_sum"][b] == pytest.approx(
            np.cumsum([c30["block_projection_mean"][b], c60["block_projection_mean"][b]]).tolist())
    vb = load_file(str(vec))
    w30 = load_file(str(tiny_run / "checkpoint-30" / "model.safetensors"))
    w60 = load_file(str(tiny_run / "checkpoint-60" / "model.safetensors"))
    trunk = [n for n in w30 if n.endswith(".weight") and any(f".{m}." in n for m in ("c_attn", "c_proj", "c_fc"))]
    dot = sum(float(vb[n][0].astype(np.float64).ravel() @ (w30[n] - w60[n]).astype(np.float64).ravel()) for n in trunk)
    nb = np.sqrt(sum(float(np.sum(vb[n][0].astype(np.float64) ** 2)) for n in trunk))
    nd = np.sqrt(sum(float(np.sum((w30[n] - w60[n]).astype(np.float64) ** 2)) for n in trunk))
    assert s["direction_cosines"]["switch"] == pytest.approx(dot / (nb * nd), rel=1e-6)
    assert c60["bootstrap"]["n_boot"] == 40 and set(c60["bootstrap"]["se"]) >= {"anisotropy", "lambda_1", "q_backbone"}
    with h5py.File(out) as f:
        g = f["fisher/step_60"]
        reps = g["bootstrap/replicates/anisotropy"][()]
        assert reps.shape == (40,)
        assert float(g["bootstrap/se"].attrs["anisotropy"]) == pytest.approx(np.std(reps[np.isfinite(reps)], ddof=1))
        assert g["gram"].shape == (4, 4) and g["block_projections"].shape == (4, 2)
        assert float(g.attrs["q_random_std_exact"]) == pytest.approx(c60["q_random_std_exact"])
        assert list(f["fisher/stiffening/anisotropy_ci_low"][()]) == pytest.approx(
            [c["bootstrap"]["ci_low"]["anisotropy"] for c in (c30, c60)])
    assert sorted(p.name for p in figs.iterdir()) == ["fisher_anisotropy.png", "fisher_rayleigh.png",
                                                      "fisher_signed_projection.png", "fisher_spectrum.png"]
    human = invoke(*common, "--no-report")
    assert human.exit_code == 0, human.output
    for title in ("sampled against exact", "signed gradient projection on the backbone", "switch pair peak 30"):
        assert title in human.stdout
