"""Speculative weight prediction: exactness of the predictors against planted trajectories and a real AdamW step,
acceptance criteria on constructed losses, and `ckptaudit extrapolate` end to end on the tiny fixture run."""

from __future__ import annotations

import io
import json
import math

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import invoke
from runs import write_checkpoint

from ckptaudit.analyses.extrapolate.predictors import (
    PredictionPlan,
    PredictionStream,
    acceptance,
    momentum_prediction,
    recent_sigma,
)
from ckptaudit.io.discover import discover_run
from ckptaudit.io.optimizer import load_optimizer_state

SHAPES = {"a.weight": (3, 4), "b.bias": (5,)}


def _write_trajectory(root, steps, theta_of):
    """checkpoint-{t}/model.safetensors (float64, so the planted values are stored exactly)."""
    for t in steps:
        write_checkpoint(root / f"checkpoint-{t}", {name: theta_of(name, t) for name in SHAPES})
    return discover_run(root)


def _collect(plan, target=None):
    """The prediction as the analysis streams it into a model (PredictionStream), and its relative error."""
    stream = PredictionStream(plan, target)
    out = {name: t.clone() for name, t in stream}
    return out, stream.rel_error


def _planted(seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}


def test_linear_prediction_exact_on_linear_trajectory(tmp_path):
    a, b = _planted(1), _planted(2)
    run = _write_trajectory(tmp_path, [0, 10, 20, 30, 40], lambda n, t: a[n] + t * b[n])
    ckpts = {c.step: c for c in run}
    for k in (5, 20, 37):
        plan = PredictionPlan("linear", ckpts[20], k, delta=10, previous=ckpts[10])
        pred, rel = _collect(plan, ckpts.get(20 + k))
        for n in SHAPES:
            torch.testing.assert_close(pred[n], a[n] + (20 + k) * b[n], rtol=1e-12, atol=1e-12)
        if k == 20:
            assert rel == pytest.approx(0.0, abs=1e-12)


def test_quadratic_prediction_exact_on_quadratic_trajectory(tmp_path):
    a, b, c = _planted(3), _planted(4), _planted(5)

    def theta(n, t):
        return a[n] + t * b[n] + 0.01 * t * t * c[n]

    run = _write_trajectory(tmp_path, [0, 10, 20, 30, 50], theta)
    ckpts = {x.step: x for x in run}
    hist = dict(delta=10, previous=ckpts[20], previous2=ckpts[10])
    for k in (5, 20, 45):
        pred, rel = _collect(PredictionPlan("quadratic-fit", ckpts[30], k, **hist), ckpts.get(30 + k))
        paper, _ = _collect(PredictionPlan("quadratic", ckpts[30], k, **hist))
        for n in SHAPES:
            torch.testing.assert_close(pred[n], theta(n, 30 + k), rtol=1e-10, atol=1e-10)
            # the paper's printed coefficient K(K-Delta)/(2 Delta^2), by hand from the stored checkpoints
            t30, t20, t10 = theta(n, 30), theta(n, 20), theta(n, 10)
            by_hand = t30 + (k / 10) * (t30 - t20) + k * (k - 10) / 200 * (t30 - 2 * t20 + t10)
            torch.testing.assert_close(paper[n], by_hand, rtol=1e-12, atol=1e-12)
            # ... which is off the parabola by exactly (K / Delta) times the second difference
            torch.testing.assert_close(pred[n] - paper[n], (k / 10) * (t30 - 2 * t20 + t10), rtol=1e-9, atol=1e-9)
        if k == 20:
            assert rel == pytest.approx(0.0, abs=1e-10)
    # linear is not exact on a curved trajectory: the relative error is clearly nonzero
    lin, rel = _collect(PredictionPlan("linear", ckpts[30], 20, delta=10, previous=ckpts[20]), ckpts[50])
    assert rel > 1e-3


def _gpt2_with_adamw(tmp_path):
    """A tiny GPT-2 and the Trainer's two-group AdamW, stepped 3 times; returns (model, optimizer, batch fn)."""
    from ckptaudit.tasks import get_task
    from ckptaudit.tasks.train import build_model, build_optimizer

    task = get_task("modadd", p=7)
    model = build_model(task.model_config(n_layer=1, n_embd=16, n_head=2), seed=0)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8)

    def step(i):
        loss, _ = task.loss_and_accuracy(model, task.batch("train", i, 16, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(3):
        step(i)
    return model, opt, task


def test_adam_step_k1_equals_a_real_adamw_step(tmp_path):
    model, opt, task = _gpt2_with_adamw(tmp_path)
    ckpt_dir = tmp_path / "checkpoint-3"
    # Weights before optimizer step 4, optimizer state (moments, step count, lr) that step 4 applies: the state a
    # Trainer checkpoint holds, with the moments of the coming step.
    model.save_pretrained(ckpt_dir, safe_serialization=True)
    loss, _ = task.loss_and_accuracy(model, task.batch("train", 3, 16, 0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch.save(opt.state_dict(), ckpt_dir / "optimizer.pt")
    (ckpt_dir / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    after = {n: p.detach().clone() for n, p in model.named_parameters()}

    ckpt = discover_run(ckpt_dir)[0]
    state = load_optimizer_state(ckpt)
    pred, _ = _collect(PredictionPlan("adam-step", ckpt, 1, optimizer=state))
    for name, value in after.items():
        torch.testing.assert_close(pred[name].float(), value, rtol=0, atol=1e-6, msg=name)
    moved = max(float((after[n] - pred[n].float()).abs().max()) for n in after)
    assert moved < 1e-6
    # and the step is real: weights did move by far more than the tolerance
    with ckpt.tensors() as src:
        assert max(float((src.get(n) - after[n]).abs().max()) for n in after if n in src) > 1e-4


def _adamw_checkpoint(tmp_path):
    """(model, its live AdamW, the Checkpoint of both saved as a Trainer checkpoint at step 3)."""
    model, opt, _ = _gpt2_with_adamw(tmp_path)
    d = tmp_path / "checkpoint-3"
    model.save_pretrained(d, safe_serialization=True)
    torch.save(opt.state_dict(), d / "optimizer.pt")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    return model, opt, discover_run(d)[0]


def test_momentum_matches_the_papers_formula_by_hand(tmp_path):
    model, opt, ckpt = _adamw_checkpoint(tmp_path)
    k, eps = 25, 1e-8
    pred, _ = _collect(PredictionPlan("momentum", ckpt, k, optimizer=load_optimizer_state(ckpt)))
    for name, p in model.named_parameters():
        st = opt.state[p]  # the live optimizer's moments, reached through the parameter object itself
        m, v = st["exp_avg"].double().numpy(), st["exp_avg_sq"].double().numpy()
        by_hand = p.detach().double().numpy() + k * m / np.sqrt(v + eps)
        np.testing.assert_allclose(pred[name].numpy(), by_hand, rtol=1e-7, atol=1e-7, err_msg=name)
    m = momentum_prediction(torch.zeros(2), torch.tensor([1.0, -2.0]), torch.tensor([4.0, 1.0]), 3, 0.0)
    torch.testing.assert_close(m, torch.tensor([1.5, -6.0]))


def test_acceptance_criteria_on_constructed_losses():
    losses = [4.0, 3.0, 2.5, 2.2, 2.0, 1.9, 1.8]
    assert recent_sigma(losses, 6, 5) == pytest.approx(np.std(losses[2:7]))
    assert recent_sigma(losses, 0, 5) == 0.0
    assert recent_sigma(losses, 1, 5) == pytest.approx(np.std(losses[:2]))
    sigma = 0.2
    assert acceptance(1.75, 1.8, sigma) == {"strict": True, "adaptive": True, "proximity": True}
    assert acceptance(1.9, 1.8, sigma) == {"strict": False, "adaptive": True, "proximity": False}
    assert acceptance(1.85, 1.8, sigma) == {"strict": False, "adaptive": True, "proximity": True}
    assert acceptance(2.1, 1.8, sigma) == {"strict": False, "adaptive": False, "proximity": False}
    assert acceptance(1.5, 1.8, sigma) == {"strict": True, "adaptive": True, "proximity": False}
    assert acceptance(1.25, 1.0, 0.0)["proximity"] is False  # strict inequality at the 5% boundary
    assert acceptance(math.nan, 1.8, sigma) == {"strict": False, "adaptive": False, "proximity": False}
    assert acceptance(math.inf, 1.8, sigma)["adaptive"] is False


EXTRAPOLATE_STEPS = (30, 40, 50, 60)  # --steps 30:60 of the tiny run (checkpoints every 10 steps)


@pytest.fixture(scope="module")
def extrapolate_report(tiny_run, tmp_path_factory):
    """`ckptaudit extrapolate` on checkpoints 30..60 of the tiny run: (its --json summary, its --out HDF5 path)."""
    out = tmp_path_factory.mktemp("extrapolate") / "x.h5"
    args = ["extrapolate", str(tiny_run), "--steps", "30:60", "--K", "5,10", "--predictor", "linear,quadratic-fit,adam-step",
            "--cascade", "2:10", "--time", "--json", "--device", "cpu", "--out", str(out)]  # fmt: skip
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), out


@pytest.mark.slow
def test_extrapolate_cli_on_tiny_run(extrapolate_report, tiny_run):
    s, out = extrapolate_report
    assert {"results", "acceptance", "mean_rel_weight_error"} <= set(s)
    row = s["results"][0]
    assert set(row) == {"step", "predictor", "K", "loss_pred", "loss_now", "loss_true", "rel_weight_error",
                        "strict", "adaptive", "proximity", "regime", "stable_run"}  # fmt: skip
    assert set(s["acceptance"]) == {"linear", "quadratic-fit", "adam-step"}
    assert set(s["acceptance"]["linear"]["10"]) == {"strict", "adaptive", "proximity"}
    # checkpoints 30..60: linear needs one earlier checkpoint, quadratic-fit two (Delta = 10)
    assert min(r["step"] for r in s["results"] if r["predictor"] == "linear") == 40
    assert min(r["step"] for r in s["results"] if r["predictor"] == "quadratic-fit") == 50
    assert min(r["step"] for r in s["results"] if r["predictor"] == "adam-step") == 30
    for r in s["results"]:
        if r["step"] + r["K"] <= 60 and r["K"] == 10:
            assert r["loss_true"] is not None and r["rel_weight_error"] is not None
        assert r["strict"] == (r["loss_pred"] < r["loss_now"])
        assert r["proximity"] == (abs(r["loss_pred"] - r["loss_now"]) < 0.05 * r["loss_now"])
    # loss_now is the checkpoint's validation loss as the trainer logged it
    logged = json.loads((tiny_run / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
    eval_loss = [e["eval_loss"] for e in logged if e.get("step") == 30 and "eval_loss" in e][0]
    assert [r["loss_now"] for r in s["results"] if r["step"] == 30][0] == pytest.approx(eval_loss, rel=1e-6)
    assert set(s["timing"]["ratio"]["linear"]) == {"5", "10"}
    # K=5 never lands on a checkpoint of a run saved every 10 steps: no weight error, and a note says why
    assert all(r["rel_weight_error"] is None for r in s["results"] if r["K"] == 5)
    untargeted = [n for n in s["notes"] if "no saved checkpoint at t+K" in n]
    assert untargeted == ["K=5: no saved checkpoint at t+K for any start, so no weight error; the run is saved every 10 "
                          "steps: choose K on saved checkpoints"]
    with h5py.File(out) as f:
        assert "extrapolate/results/loss_pred" in f and "extrapolate/acceptance/linear/10" in f


def _stored(ckpt_dir) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float64 numpy arrays, read with safetensors itself."""
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(ckpt_dir / "model.safetensors")).items()}


def _hand_loss(ckpt_dir, weights: dict[str, np.ndarray]) -> float:
    """Validation loss of GPT-2 built by transformers itself and given ``weights`` (float32) by load_state_dict."""
    from transformers import GPT2LMHeadModel

    from ckptaudit.tasks import task_from_checkpoint_dir

    model = GPT2LMHeadModel.from_pretrained(ckpt_dir).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # the head is tied to the embeddings
    return task_from_checkpoint_dir(ckpt_dir).evaluate(model, "validation")[0]


@pytest.mark.slow
def test_extrapolate_cascade_summary_by_hand(extrapolate_report, tiny_run):
    """The 2:10 linear cascades recomputed without ckptaudit's loaders or predictors: link d from t is
    theta_t + d (theta_t - theta_{t-10}) (numpy), its loss from a transformers-loaded GPT-2; acceptance, leading
    accepted links and the summary by hand."""
    s, _ = extrapolate_report
    theta = {t: _stored(tiny_run / f"checkpoint-{t}") for t in EXTRAPOLATE_STEPS}
    loss = {t: _hand_loss(tiny_run / f"checkpoint-{t}", theta[t]) for t in EXTRAPOLATE_STEPS}
    for r in s["results"]:
        assert r["loss_now"] == pytest.approx(loss[r["step"]], rel=1e-6)
    links = {(r["step"], r["link"]): r for r in s["cascades"]["results"] if r["predictor"] == "linear"}
    assert sorted(links) == [(t, d) for t in (40, 50, 60) for d in (1, 2)]
    one_shot = {r["step"]: r for r in s["results"] if r["predictor"] == "linear" and r["K"] == 10}
    depths = {c: [] for c in ("strict", "adaptive", "proximity")}
    for i, t in enumerate(EXTRAPOLATE_STEPS):
        if t == 30:
            continue
        window = [loss[u] for u in EXTRAPOLATE_STEPS[max(0, i - 4) : i + 1]]
        sigma = float(np.std(window))
        ref, accepted = loss[t], {c: [] for c in depths}
        for d in (1, 2):
            pred = {k: theta[t][k] + d * (theta[t][k] - theta[t - 10][k]) for k in theta[t]}
            hand = _hand_loss(tiny_run / f"checkpoint-{t}", pred)
            assert links[(t, d)]["loss_pred"] == pytest.approx(hand, rel=1e-6), (t, d)
            if d == 1:  # the first link is the one-shot K=10 prediction
                assert one_shot[t]["loss_pred"] == pytest.approx(hand, rel=1e-6)
            accepted["strict"].append(hand < ref)
            accepted["adaptive"].append(hand < ref + sigma)
            accepted["proximity"].append(abs(hand - ref) < 0.05 * abs(ref))
            ref = hand  # link d is validated against link d - 1
        for c, flags in accepted.items():
            depths[c].append(flags.index(False) if False in flags else len(flags))
    summary = s["cascades"]["summary"]["2:10"]["linear"]
    for c, ds in depths.items():
        assert summary[c]["mean_depth"] == pytest.approx(sum(ds) / 3), c
        assert summary[c]["full_chain"] == pytest.approx(sum(d == 2 for d in ds) / 3), c


@pytest.mark.slow
def test_mean_rel_weight_error_in_json_and_hdf5_by_hand(extrapolate_report, tiny_run):
    """mean_rel_weight_error[predictor][K] is the mean over t of ||theta_hat - theta(t+K)|| / ||theta(t+K) - theta_t||,
    here by hand with numpy from the stored checkpoints (linear and quadratic-fit, K = 10), in both the JSON and the
    HDF5 report; K = 5 lands between checkpoints, so it has no value (None; listed in none_attrs)."""
    from ckptaudit.cli.extrapolate_cmd import render_extrapolate
    from ckptaudit.report.console import Output, fmt

    s, out = extrapolate_report
    theta = {t: _stored(tiny_run / f"checkpoint-{t}") for t in EXTRAPOLATE_STEPS}

    def rel(pred: dict, t: int) -> float:
        err = sum(float(np.sum((pred[k] - theta[t + 10][k]) ** 2)) for k in pred)
        move = sum(float(np.sum((theta[t + 10][k] - theta[t][k]) ** 2)) for k in pred)
        return math.sqrt(err / move)

    def linear(t):
        return {k: theta[t][k] + (theta[t][k] - theta[t - 10][k]) for k in theta[t]}

    def quadratic_fit(t):  # parabola through t-20, t-10, t at t+10: 3 theta_t - 3 theta_{t-10} + theta_{t-20}
        return {k: 3 * theta[t][k] - 3 * theta[t - 10][k] + theta[t - 20][k] for k in theta[t]}

    by_hand = {"linear": [rel(linear(t), t) for t in (40, 50)], "quadratic-fit": [rel(quadratic_fit(50), 50)]}
    for pred, values in by_hand.items():
        rows = sorted((r["step"], r["rel_weight_error"]) for r in s["results"] if r["predictor"] == pred and r["K"] == 10)
        assert [e for _, e in rows if e is not None] == pytest.approx(values, rel=1e-9)
        expected = sum(values) / len(values)
        assert s["mean_rel_weight_error"][pred]["10"] == pytest.approx(expected, rel=1e-9)
        assert s["mean_rel_weight_error"][pred]["5"] is None
    assert 0.0 < s["mean_rel_weight_error"]["adam-step"]["10"] < math.inf
    with h5py.File(out) as f:
        group = f["extrapolate/mean_rel_weight_error"]
        assert set(group) == {"linear", "quadratic-fit", "adam-step"}
        for pred, values in by_hand.items():
            assert float(group[pred].attrs["10"]) == pytest.approx(sum(values) / len(values), rel=1e-9)
            assert json.loads(group[pred].attrs["none_attrs"]) == ["5"]
        assert float(group["adam-step"].attrs["10"]) == pytest.approx(s["mean_rel_weight_error"]["adam-step"]["10"])
    # the terminal table prints the stored value: it no longer needs the per-prediction rows
    stream = io.StringIO()
    render_extrapolate(Output(stream=stream), dict(s, results=[]), "tiny")
    line = next(ln for ln in stream.getvalue().splitlines() if ln.split("│")[1:3] and
                [c.strip() for c in ln.split("│")[1:3]] == ["linear", "10"])  # fmt: skip
    assert fmt(s["mean_rel_weight_error"]["linear"]["10"]) in line


def test_extrapolate_rejects_unknown_predictor(tiny_run):
    res = invoke("extrapolate", str(tiny_run), "--predictor", "cubic", "--no-report")
    assert res.exit_code == 2
    assert "cubic" in res.output


def test_readme_extrapolate_example_lands_on_saved_checkpoints():
    """The README's extrapolate example on the make-demo run: every K (and cascade K) is a multiple of the demo's
    save interval and within its training, so every K gets a weight error."""
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "fixtures"))
    try:
        from make_fixtures import RUNS
    finally:
        sys.path.pop(0)
    train = RUNS["demo"][""]["train"]
    lines = [ln for ln in (root / "README.md").read_text().splitlines() if ln.startswith("ckptaudit extrapolate fixtures/runs/demo")]
    assert lines
    for line in lines:
        ks = [int(k) for k in re.search(r"--K ([\d,]+)", line).group(1).split(",")]
        ks += [int(m.split(":")[1]) for m in re.findall(r"--cascade (\d+:\d+)", line)]
        assert all(k % train["save_steps"] == 0 and k < train["steps"] for k in ks), (line, train)
