"""Backbone analysis against brute force: numpy full SVD of the explicitly stacked drift matrix."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from runs import FakeRun, gpt2_config, gpt2_shapes, make_run, random_trajectory
from safetensors import safe_open
from test_gram import reference_parts, stacked

from ckptaudit.analyses.backbone.metrics import backbone_from_gram, detect_switches, sign_flip_step
from ckptaudit.analyses.backbone.run import run_backbone
from ckptaudit.report.hdf5 import write_tree

D_MODEL, LAYERS, W = 8, 2, 4
STEPS = [0, 10, 20, 35, 50, 60, 70, 85, 100, 110, 125, 140, 150, 170]


def rel(a, b, tol=1e-6):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(np.abs(b).max(initial=0.0), 1e-300))


def brute(X: np.ndarray, steps, anchor_step, window: int, switches=(), normalize=False) -> dict:
    """Every backbone quantity from an explicit SVD of X (rows optionally normalised)."""
    Xa = X / np.linalg.norm(X, axis=1, keepdims=True) if normalize else X
    _, S, Vt = np.linalg.svd(Xa, full_matrices=False)
    vb = Vt[0] * (1 if Xa[-1] @ Vt[0] > 0 else -1)
    rho = S**2 / np.sum(S**2)
    cum = np.cumsum(rho)
    a = Xa @ vb
    r = np.linalg.norm(Xa - np.outer(a, vb), axis=1)
    fb = a**2 / np.sum(Xa**2, axis=1)
    wins = []
    for w in range(len(X) - window + 1):
        vw = np.linalg.svd(Xa[w : w + window], full_matrices=False)[2][0]
        wins.append(abs(vw @ vb))
    U = np.diff(np.vstack([np.zeros(X.shape[1]), Xa]), axis=0)
    C = U @ vb / np.linalg.norm(U, axis=1)
    raw_u = np.diff(np.vstack([np.zeros(X.shape[1]), X]), axis=0)
    nu = np.linalg.norm(raw_u, axis=1) / np.diff([anchor_step, *steps])
    rows = {s: X[i] for i, s in enumerate(steps)}
    rows[anchor_step] = np.zeros(X.shape[1])
    V = np.vstack([vb, Vt[1:]])
    sw, dirs = [], []
    for p, q in switches:
        v = rows[p] - rows[q]
        v = v / np.linalg.norm(v)
        dirs.append(v)
        c1 = v @ vb
        perp = v - c1 * vb
        perp /= np.linalg.norm(perp)
        e26 = sum((perp @ V[k]) ** 2 for k in range(1, min(6, len(V))))
        sw.append({"cos": c1, "share": c1**2, "e26": e26, "pc": V[: min(6, len(V))] @ v})
    pair = np.abs(np.array([[x @ y for y in dirs] for x in dirs])) if dirs else None
    return {"sigma": S, "rho": rho[:20], "k95": int(np.argmax(cum >= 0.95) + 1), "k99": int(np.argmax(cum >= 0.99) + 1),
            "a": a, "r": r, "fb": fb, "wins": np.array(wins), "C": C, "nu": nu, "V": V, "sw": sw, "pair": pair}


def check(res, ref, velocity=True):
    rel(res.sigma, ref["sigma"])
    rel(res.rho, ref["rho"])
    assert (res.k95, res.k99) == (ref["k95"], ref["k99"])
    rel(res.a, ref["a"])
    assert res.a[-1] > 0
    rel(res.r_norm, ref["r"])
    rel(res.f_b, ref["fb"])
    rel(res.window_alignment, ref["wins"])
    assert math.isclose(res.window_alignment_mean, float(np.mean(ref["wins"])), rel_tol=1e-6)
    rel(res.update_alignment, ref["C"])
    if velocity:
        rel(res.velocity, ref["nu"])
    assert len(res.switches) == len(ref["sw"])
    for got, want in zip(res.switches, ref["sw"], strict=True):
        assert math.isclose(got.backbone_cos_signed, want["cos"], rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(got.backbone_share, want["share"], rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(got.e_2_6, want["e26"], rel_tol=1e-6, abs_tol=1e-9)
        np.testing.assert_allclose(got.pc_cos[0], want["pc"][0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.abs(got.pc_cos), np.abs(want["pc"]), rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> FakeRun:
    shapes = gpt2_shapes(D_MODEL, LAYERS)
    return make_run(tmp_path_factory.mktemp("bb"), random_trajectory(shapes, len(STEPS), seed=7, noise=0.04), STEPS,
                    gpt2_config(D_MODEL, LAYERS))


def test_every_quantity_matches_brute_force_svd(run, tmp_path):
    sw = [(60, 85), (110, 150), (0, 35)]  # the anchor step is allowed (x = 0)
    rep = run_backbone(run, window=W, switches=sw, normalize_rows=True, save_vectors=tmp_path / "v.safetensors",
                       top_k_vectors=4, chunk_elems=100)
    parts = reference_parts(D_MODEL, LAYERS)
    steps = STEPS[1:]
    assert list(rep.steps) == steps and rep.anchor_step == 0
    results = {"trunk": rep.trunk, "block_0": rep.blocks[0], "block_1": rep.blocks[1], "group_G": rep.groups["G"],
               "group_S": rep.groups["S"]}
    for name, res in results.items():
        X = stacked(run, parts[name])
        assert rep.dims[name] == X.shape[1]
        ref = brute(X, steps, 0, W, sw)
        check(res, ref)
        if name == "trunk":
            rel(rep.switch_cos, ref["pair"])
            trunk_ref = ref
        n = rep.normalized
        norm_res = {"trunk": n["trunk"], "block_0": n["blocks"][0], "block_1": n["blocks"][1],
                    "group_G": n["groups"]["G"], "group_S": n["groups"]["S"]}[name]
        check(norm_res, brute(X, steps, 0, W, sw, normalize=True), velocity=True)
    # saved vectors: V_1..V_4 of the trunk, full-tensor layout, zeros outside the trunk pieces
    with safe_open(str(tmp_path / "v.safetensors"), framework="np") as f:
        meta = f.metadata()
        assert int(meta["k"]) == 4 and meta["anchor_step"] == "0"
        saved = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (4, D_MODEL, 3 * D_MODEL)
    assert "transformer.wte.weight" not in saved
    vecs = np.stack([np.concatenate([saved[n][j][idx].ravel() for n, idx in parts["trunk"]]) for j in range(4)])
    np.testing.assert_allclose(vecs[0], trunk_ref["V"][0], atol=2e-6)  # the backbone keeps its sign
    for j in range(1, 4):
        s = np.sign(vecs[j] @ trunk_ref["V"][j])
        np.testing.assert_allclose(s * vecs[j], trunk_ref["V"][j], atol=2e-6)
    np.testing.assert_allclose(np.asarray(rep.vector_sigma), trunk_ref["sigma"][:4], rtol=1e-6)


def test_anchor_other_than_first(run):
    rep = run_backbone(run, anchor_step=35, window=W, switches=[(35, 100)], blocks=[1])
    assert list(rep.blocks) == [1] and rep.settings["unused_checkpoints_before_anchor"] == [0, 10, 20]
    steps = STEPS[4:]
    for name, res in (("trunk", rep.trunk), ("block_1", rep.blocks[1]), ("group_S", rep.groups["S"])):
        X = stacked(run, reference_parts(D_MODEL, LAYERS)[name], anchor_idx=3)
        check(res, brute(X, steps, 35, W, [(35, 100)]))


def test_planted_rank_one_drift_is_recovered(tmp_path):
    shapes = gpt2_shapes(D_MODEL, 1)
    g = torch.Generator().manual_seed(11)
    planted = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    steps = list(range(0, 120, 10))
    r = make_run(tmp_path / "run", random_trajectory(shapes, len(steps), seed=5, drift=0.2, noise=1e-4, planted=planted),
                 steps, gpt2_config(D_MODEL, 1))
    rep = run_backbone(r, window=W, save_vectors=tmp_path / "v.safetensors", top_k_vectors=2)
    assert rep.trunk.rho[0] > 0.999 and rep.trunk.k95 == 1
    parts = reference_parts(D_MODEL, 1)["trunk"]
    w = np.concatenate([planted[n].double().numpy()[idx].ravel() for n, idx in parts])
    w /= np.linalg.norm(w)
    with safe_open(str(tmp_path / "v.safetensors"), framework="np") as f:
        v1 = np.concatenate([f.get_tensor(n)[0].astype(np.float64)[idx].ravel() for n, idx in parts])
    assert abs(v1 @ w) > 0.999
    assert np.all(np.asarray(rep.trunk.f_b) > 0.99) and rep.trunk.window_alignment_mean > 0.999


def test_bf16_sharded_run(tmp_path):
    shapes = gpt2_shapes(D_MODEL, 1)
    steps = STEPS[:8]
    r = make_run(tmp_path, random_trajectory(shapes, len(steps), seed=2), steps, gpt2_config(D_MODEL, 1),
                 dtype=torch.bfloat16, shards=2)
    rep = run_backbone(r, window=3, switches=[(20, 50)])
    X = stacked(r, reference_parts(D_MODEL, 1)["trunk"])  # bf16 values upcast
    check(rep.trunk, brute(X, steps[1:], 0, 3, [(20, 50)]))


def test_gram_only_entry_and_sign_convention():
    rng = np.random.default_rng(0)
    X = np.cumsum(rng.normal(size=(9, 40)), axis=0) - 0.5 * np.arange(1, 10)[:, None]
    steps = list(range(1, 10))
    for flip in (1.0, -1.0):  # the sign of u_1 from eigh is arbitrary; the result is not
        res = backbone_from_gram((flip * X) @ (flip * X).T, steps, window=3, anchor_step=0, switches=[(2, 7)])
        check(res, brute(flip * X, steps, 0, 3, [(2, 7)]))
        assert res.a[-1] > 0
    short = backbone_from_gram(X[:2] @ X[:2].T, steps[:2], window=10, anchor_step=0)
    assert short.window_alignment.size == 0 and short.window_alignment_mean is None


def test_sign_flip_rule():
    steps = list(range(100, 1100, 100))
    # early mean over max(3, ceil(10%)) = 3 updates is negative; first lasting positive run starts at step 600
    C = np.array([-0.3, -0.2, 0.1, -0.2, -0.1, 0.2, 0.3, 0.1, -0.1, 0.2])
    assert sign_flip_step(C, steps) == 600
    assert sign_flip_step(-C, steps) == 600
    assert sign_flip_step(np.array([-0.3, -0.2, -0.1, 0.2]), steps[:4]) is None  # a flip on the last row only
    assert sign_flip_step(np.array([0.1, 0.2]), steps[:2]) is None
    long = np.concatenate([np.full(30, 0.2), [-0.1], np.full(10, 0.1), [-0.2, -0.3]])  # n_early = ceil(4.3) = 5
    assert sign_flip_step(long, list(range(len(long)))) == 41


def test_consolidation_and_velocity():
    steps = [10, 20, 30, 50, 70, 90]
    # rows along one axis: increments 5, 4, 1, 0.6, 0.2, 0.1 -> velocities 0.5, 0.4, 0.1, 0.03, 0.01, 0.005
    x = np.cumsum([5.0, 4.0, 1.0, 0.6, 0.2, 0.1])[:, None] * np.array([[1.0, 0.0]])
    res = backbone_from_gram(x @ x.T + 0.0, steps, window=3, anchor_step=0)
    rel(res.velocity, [0.5, 0.4, 0.1, 0.03, 0.01, 0.005])
    assert res.consolidation_step == 50  # 0.1 is not below 10% of 0.5; 0.03 and later are


def test_detect_switches_from_log_history():
    hist = [{"step": s, "p_ood": v} for s, v in zip(range(0, 110, 10), [0.1, 0.3, 0.5, 0.4, 0.2, 0.2, 0.6, 0.7, 0.3, 0.1, 0.2], strict=True)]
    hist.insert(3, {"step": 25, "loss": 1.0})  # entries without the metric are ignored
    # maxima at 20 and 70, minima at 40 (plateau start) and 90 -> (20, 40), (70, 90); mapped to checkpoints
    assert detect_switches(hist, "p_ood", [0, 25, 50, 75, 100]) == [(25, 50), (75, 100)]
    assert detect_switches(hist, "p_ood", list(range(0, 110, 10))) == [(20, 40), (70, 90)]
    assert detect_switches(hist, "missing", [0, 10]) == []


def test_metric_switches_and_report_trees(tmp_path):
    shapes = gpt2_shapes(D_MODEL, 1)
    steps = [0, 10, 20, 30, 40, 50, 60]
    hist = [{"step": s, "eval_loss": v} for s, v in zip(steps, [3.0, 2.0, 2.5, 1.5, 1.8, 1.2, 1.3], strict=True)]
    r = make_run(tmp_path / "run", random_trajectory(shapes, len(steps), seed=4), steps, gpt2_config(D_MODEL, 1),
                 log_history=hist)
    rep = run_backbone(r, window=3, metric="eval_loss", switches=[(10, 60)])
    assert rep.switches == ((10, 60), (20, 30), (40, 50))
    js = rep.to_json()
    assert set(js) >= {"steps", "trunk", "blocks", "groups", "switch"}
    keys = {"rho", "sigma", "k95", "k99", "a", "r_norm", "f_b", "window_alignment", "window_alignment_mean",
            "update_alignment", "sign_flip_step"}
    keys |= {"window_rotation", "window_rotation_deg", "window_rotation_mean", "window_rotation_max_deg",
             "window_rotation_start_step", "local_window_rotation", "local_window_rotation_deg",
             "local_window_rotation_mean", "speed_a", "speed_r_norm", "speed_residual", "loglog_a", "loglog_r_norm",
             "fit_range", "a_rownorm", "r_norm_rownorm", "rownorm_backbone_abs_cos"}
    assert set(js["trunk"]) == keys and set(js["blocks"]["0"]) == keys
    assert set(js["groups"]) == {"G", "S"} and set(js["groups"]["G"]) == keys | {"velocity", "consolidation_step"}
    assert len(js["trunk"]["a"]) == len(js["steps"]) == len(js["trunk"]["update_alignment"]) == 6
    assert len(js["switch"]) == 3 and {"peak", "trough", "abs_cos_backbone", "e_2_6"} <= set(js["switch"][0])
    import json

    json.dumps(js, allow_nan=False)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        write_tree(f.create_group("backbone"), rep.to_hdf5_tree())
    with h5py.File(tmp_path / "r.h5", "r") as f:
        b = f["backbone"]
        for g in ("trunk", "block_0", "group_G", "group_S"):
            for ds in ("steps", "sigma", "rho", "a", "r_norm", "f_b", "window_alignment", "update_alignment"):
                assert ds in b[g], (g, ds)
            assert "k95" in b[g].attrs and "k99" in b[g].attrs
        assert "consolidation_step" in b["group_G"].attrs or "consolidation_step" in b["group_G"].attrs["none_attrs"]
        np.testing.assert_array_equal(b["trunk"]["a"][()], rep.trunk.a)


def test_bad_anchor_and_switch_are_usage_errors(run):
    from ckptaudit.errors import UsageError

    with pytest.raises(UsageError, match="--anchor 5"):
        run_backbone(run, anchor_step=5)
    with pytest.raises(UsageError, match="step 15"):
        run_backbone(run, switches=[(15, 20)])


def test_fixture_run(tiny_run):
    import ckptaudit.io.discover as discover
    r = discover.discover_run(tiny_run)
    rep = run_backbone(r, window=3)
    assert len(rep.steps) == len(r.checkpoints) - 1
    cfg = r.checkpoints[0].config()
    d, n_layers = int(cfg["n_embd"]), int(cfg["n_layer"])
    X = stacked(r, reference_parts(d, n_layers)["trunk"])
    check(rep.trunk, brute(X, list(rep.steps), rep.anchor_step, 3))


def test_steps_subset_keeps_the_runs_anchor(tiny_run):
    """--steps picks the drift rows; the anchor stays the run's first checkpoint (or --anchor), as numpy's SVD of
    the rows theta(t) - theta(anchor) says."""
    import json

    from cli_helpers import invoke

    from ckptaudit.io.discover import discover_run

    run = discover_run(tiny_run)
    parts = reference_parts(32, 2)["trunk"]
    for extra, anchor_idx in (([], 0), (["--anchor", "10"], 1)):
        r = invoke("backbone", tiny_run, "--steps", "30:60", *extra, "--json", "--no-report", "--device", "cpu")
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["anchor_step"] == run.checkpoints[anchor_idx].step and doc["steps"] == [30, 40, 50, 60]
        rows = [c for c in run.checkpoints if c.step in (30, 40, 50, 60)]
        X = stacked(run, parts, anchor_idx=anchor_idx, rows=rows)
        rel(doc["trunk"]["sigma"], np.linalg.svd(X, compute_uv=False), 1e-9)
    r = invoke("backbone", tiny_run, "--steps", "30:60", "--anchor", "15", "--no-report")
    assert r.exit_code == 2 and "--anchor 15" in r.stderr


def test_window_mean_skips_windows_without_a_pc1():
    """Rows equal to the anchor (x = 0) make a window with no PC1 (NaN); the mean is over the defined windows, each
    checked against numpy's SVD of that window."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((8, 30))
    X[:3] = 0.0  # the first three checkpoints did not move
    res = backbone_from_gram(X @ X.T, list(range(10, 90, 10)), window=3, anchor_step=0)
    vb = np.linalg.svd(X, full_matrices=False)[2][0]
    want = [abs(np.linalg.svd(X[w : w + 3], full_matrices=False)[2][0] @ vb) for w in range(1, 6)]
    assert np.isnan(res.window_alignment[0])
    np.testing.assert_allclose(res.window_alignment[1:], want, rtol=1e-9)
    assert res.window_alignment_mean == pytest.approx(np.mean(want), rel=1e-9)


def test_run_shorter_than_the_window_gets_one_window_and_a_note(tiny_run):
    """tiny has 6 drift rows after its anchor, fewer than the default window of 10: c(w) is one window over all the
    rows (its PC1 is v_b itself, so c = 1), and the settings say so instead of leaving c(w) empty."""
    from ckptaudit.io.discover import discover_run

    report = run_backbone(discover_run(tiny_run))
    assert len(report.steps) == 6
    assert report.settings["window"] == 10 and report.settings["window_used"] == 6
    assert "6 drift rows" in report.settings["window_note"]
    assert report.trunk.window_alignment.shape == (1,)
    assert report.trunk.window_alignment[0] == pytest.approx(1.0, abs=1e-9)
    longer = run_backbone(discover_run(tiny_run), window=3)
    assert longer.settings["window_note"] is None and longer.trunk.window_alignment.shape == (4,)
