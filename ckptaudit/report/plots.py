"""Optional PNG figures (matplotlib, the `plot` extra). Commands call these with their JSON summaries."""

from __future__ import annotations

from pathlib import Path

from ckptaudit.errors import UsageError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib", "pip install 'ckptaudit[plot]'") from None
    return plt


def _save(plt, fig, path: Path, dpi: int = 120) -> Path:
    """Lay out, write and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_backbone(summary: dict, out_dir: Path) -> list[Path]:
    """a(t) and ||r(t)|| per parameter set, the rho spectrum, and C(t). Returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = summary["steps"]
    sets = {"trunk": summary["trunk"]}
    sets.update({f"group_{g}": r for g, r in summary.get("groups", {}).items()})
    sets.update({f"block_{b}": r for b, r in summary.get("blocks", {}).items()})
    written = []
    for name, r in sets.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, r["a"], label="a(t) backbone coordinate")
        ax.plot(steps, r["r_norm"], label="||r(t)|| transverse residual")
        ax.set_xlabel("step")
        ax.set_title(f"{name}: backbone vs residual")
        ax.legend()
        written.append(_save(plt, fig, out_dir / f"backbone_{name}_a_r.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in sets.items():
        ax.semilogy(range(1, len(r["rho"]) + 1), [max(x, 1e-16) for x in r["rho"]], marker="o", ms=3, label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("rho_k")
    ax.set_title("explained variance spectrum")
    ax.legend(fontsize=7)
    written.append(_save(plt, fig, out_dir / "backbone_rho.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    c = summary["trunk"]["update_alignment"]
    ax.plot(steps[len(steps) - len(c):], c, marker=".")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("C(t)")
    ax.set_title("update-direction alignment with the backbone")
    written.append(_save(plt, fig, out_dir / "backbone_update_alignment.png"))
    written += _plot_backbone_dynamics(plt, summary, out_dir)
    return written


def _plot_backbone_dynamics(plt, summary: dict, out_dir: Path) -> list[Path]:
    """Window stability vs rotation, a(t) on the raw and row-normalised backbones, and the log-log fits (trunk)."""
    import math

    t, steps, written = summary["trunk"], summary["steps"], []
    W = summary["settings"]["window"]
    if t.get("window_alignment"):
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        ax.plot(steps[: len(t["window_alignment"])], t["window_alignment"], marker=".", label="c(w) vs global backbone")
        rot = t.get("window_rotation") or []
        ax.plot(t["window_rotation_start_step"], rot, marker=".", label="rotation |cos| window w vs w+1")
        ax.plot(t["window_rotation_start_step"], t.get("local_window_rotation") or [], marker=".", ls="--",
                label="local rotation (re-anchored, unit rows)")
        ax.set_xlabel(f"first step of window w ({W} rows)")
        ax.set_title("trunk: window PC1 stability")
        ax.legend(fontsize=7)
        written.append(_save(plt, fig, out_dir / "backbone_window_rotation.png"))
    if t.get("a_rownorm"):
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        ax.plot(steps, t["a"], label="a(t), raw backbone")
        ax.plot(steps, t["a_rownorm"], ls="--", label="a(t), row-normalised backbone")
        ax.plot(steps, t["r_norm"], label="||r(t)||, raw backbone")
        ax.plot(steps, t["r_norm_rownorm"], ls="--", label="||r(t)||, row-normalised backbone")
        ax.set_xlabel("step")
        ax.set_title("trunk: raw vs row-normalised backbone")
        ax.legend(fontsize=7)
        written.append(_save(plt, fig, out_dir / "backbone_a_raw_rownorm.png"))
    fits = [(k, t.get(f"loglog_{k}")) for k in ("a", "r_norm")]
    if any(f for _, f in fits):
        anchor = summary["anchor_step"]
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        for key, fit in fits:
            pts = [(s - anchor, abs(v)) for s, v in zip(steps, t[key]) if v and s > anchor]
            if not pts or not fit:
                continue
            line = ax.loglog(*zip(*pts), marker=".", ls="", label=f"|{key}| ~ τ^{fit['slope']:.3g}")[0]
            lo, hi = fit["first_step"] - anchor, fit["last_step"] - anchor
            ax.loglog([lo, hi], [10 ** (fit["intercept"] + fit["slope"] * math.log10(x)) for x in (lo, hi)],
                      color=line.get_color())
        ax.set_xlabel("τ = steps since the anchor")
        ax.set_title("trunk: power-law fits")
        ax.legend(fontsize=7)
        written.append(_save(plt, fig, out_dir / "backbone_loglog.png"))
    return written


def plot_finetune(summary: dict, out_dir: Path) -> list[Path]:
    """One PNG per run: Phi, S, D (left axis) and the CE loss (right axis) against the step. Returns the files."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, c in enumerate(summary["contexts"]):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        t = range(len(c["phi"]))
        ax.plot(t, c["phi"], label="Phi", lw=2)
        ax.plot(t, c["signal"], label="signal S", ls="--")
        ax.plot(t, c["drag"], label="drag D", ls=":")
        ax.axhline(0.0, color="grey", lw=0.6)
        if c["flip_step"] is not None:
            ax.axvline(c["flip_step"], color="tab:red", lw=0.8, label=f"flip (step {c['flip_step']})")
        ax2 = ax.twinx()
        ax2.plot(t, c["loss"], color="black", alpha=0.4, label="CE loss")
        ax2.set_ylabel("CE loss")
        ax.set_xlabel("step")
        ax.set_title(f"{c['target'].strip()} vs {c['competitor'].strip()} — {c['mode']}, lr {c['lr']:g}")
        ax.legend(loc="best", fontsize=8)
        safe = "".join(ch if ch.isalnum() else "_" for ch in c["target"].strip()) or "target"
        written.append(_save(plt, fig, out_dir / f"finetune_{i:03d}_{safe}_lr{c['lr']:g}.png", dpi=110))
    return written


def plot_resume(summary: dict, out_dir: Path) -> Path:
    """resume_probe_accuracy.png: eval accuracy over resumed steps, one line per condition."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in summary["conditions"]:
        style = "-" if c["optimizer"] == "preserved" else "--"
        ax.plot(c["steps"], c["eval_acc"], style, marker=".", label=f"{c['name']} ({c['verdict']})")
    ax.set_xlabel(f"resumed steps after step {summary['start_step']}")
    ax.set_ylabel("eval accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("resume-probe: preserved vs reset optimizer state")
    ax.legend(fontsize=7)
    return _save(plt, fig, out_dir / "resume_probe_accuracy.png")


def _num(x) -> float:
    """None -> NaN, for series with gaps."""
    return float("nan") if x is None else float(x)


def _yerr(values: list, low: list, high: list) -> list[list[float]]:
    """Asymmetric error bars from an interval (NaN where there is none)."""
    v = [_num(x) for x in values]
    return [[max(0.0, a - _num(lo)) for a, lo in zip(v, low)], [max(0.0, _num(hi) - a) for a, hi in zip(v, high)]]


def plot_fisher(summary: dict, out_dir: Path) -> list[Path]:
    """fisher_rayleigh.png (q(v) per direction over the steps, q(v_b) with its bootstrap interval),
    fisher_anisotropy.png (alpha with its interval, alpha exact), fisher_spectrum.png (eigenvalues by rank) and
    fisher_signed_projection.png (per-block raw <g_l, v_b^l> mean ± std and its running sum). Returns the files."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cks, st = summary["checkpoints"], summary["stiffening"]
    steps = st["steps"]
    written = []
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name in cks[0]["q"]:
        vals = [_num(c["q"].get(name)) for c in cks]
        if name == "backbone":
            ax.errorbar(steps, vals, yerr=_yerr(vals, st["q_backbone_ci_low"], st["q_backbone_ci_high"]),
                        marker="o", capsize=3, lw=2, label="q(v_b)")
        elif name == "random_mean":
            sd = [_num(c.get("q_random_std")) for c in cks]
            ax.errorbar(steps, vals, yerr=sd, marker=".", color="grey", capsize=2, label="q(random), ± std over K")
        else:
            ax.plot(steps, vals, marker=".", label=f"q({name})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("Rayleigh quotient v^T F v")
    ax.set_title("fisher: quotients along the trajectory directions")
    ax.legend(fontsize=7)
    written.append(_save(plt, fig, out_dir / "fisher_rayleigh.png"))
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    al = [_num(a) for a in st["anisotropy"]]
    ax.errorbar(steps, al, yerr=_yerr(al, st["anisotropy_ci_low"], st["anisotropy_ci_high"]), marker="o", capsize=3,
                label="alpha (K random directions), bootstrap interval")
    ax.plot(steps, [_num(a) for a in st["anisotropy_exact"]], marker="s", ls="--", label="alpha exact")
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("q(v_b) / q(random)")
    ax.set_title("fisher: anisotropy")
    ax.legend(fontsize=7)
    written.append(_save(plt, fig, out_dir / "fisher_anisotropy.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for c in cks:
        ev = [max(_num(x), 1e-300) for x in c["top_eigenvalues"]]
        ax.semilogy(range(1, len(ev) + 1), ev, marker=".", label=f"step {c['step']}")
    ax.set_xlabel("rank")
    ax.set_ylabel("Fisher eigenvalue s_j / M")
    ax.set_title("fisher: spectrum")
    ax.legend(fontsize=7)
    written.append(_save(plt, fig, out_dir / "fisher_spectrum.png"))
    blocks = list(cks[0].get("block_projection_mean") or {})
    if blocks:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
        for b in blocks:
            m = [_num(c["block_projection_mean"][b]) for c in cks]
            top.errorbar(steps, m, yerr=[_num(c["block_projection_std"][b]) for c in cks], marker=".", capsize=2,
                         label=f"block {b}")
            bottom.plot(steps, summary["block_projection_running_sum"][b], marker=".", label=f"block {b}")
        for ax in (top, bottom):
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.legend(fontsize=7, ncol=4)
        top.set_ylabel("<g_l, v_b^l>, mean ± std")
        bottom.set_ylabel("running sum")
        bottom.set_xlabel("step")
        top.set_title("fisher: signed gradient projection on the block backbones")
        written.append(_save(plt, fig, out_dir / "fisher_signed_projection.png"))
    return written


def acceptance_series(summary: dict, criterion: str, gated: bool = False) -> dict[str, dict[str, list]]:
    """predictor -> {"K", "rate", "low", "high", "n"} of ``criterion``'s acceptance rate by K with its Wilson
    interval, from an extrapolate summary (``gated``: among the predictions the K-consecutive gate trusts)."""
    src = summary.get("gate") if gated else summary
    if not src:
        return {}
    unc = src["uncertainty"] if gated else (summary.get("acceptance_uncertainty") or {}).get("rates", {})
    out: dict[str, dict[str, list]] = {}
    for pred, by_k in src["acceptance"].items():
        ks = sorted(by_k, key=int)
        wil = [((unc.get(pred, {}).get(k, {}).get(criterion) or {}).get("wilson") or [None, None]) for k in ks]
        out[pred] = {"K": [int(k) for k in ks], "rate": [_num(by_k[k][criterion]) for k in ks],
                     "low": [_num(w[0]) for w in wil], "high": [_num(w[1]) for w in wil],
                     "n": [int(src["counts"].get(pred, {}).get(k, 0)) for k in ks]}
    return out


def extrapolate_acceptance_figure(plt, summary: dict, label: str):
    """One panel per acceptance criterion: rate by K per predictor with 95% Wilson error bars; with a gate, the
    rates among trusted predictions dashed beside them. Returns the figure."""
    from matplotlib.ticker import MaxNLocator

    crits = ("strict", "adaptive", "proximity")
    fig, axes = plt.subplots(1, len(crits), figsize=(13, 4), sharey=True)
    ks = sorted({int(k) for by_k in summary["acceptance"].values() for k in by_k})
    gate = summary.get("gate")
    preds = list(summary["acceptance"])
    series = len(preds) * (2 if gate else 1)
    width = 0.025 * (ks[-1] - ks[0]) if len(ks) > 1 else 0.1  # dodge so that the error bars do not overlap

    def dodge(j: int, xs: list[int]) -> list[float]:
        return [x + width * (j - (series - 1) / 2) for x in xs]

    for ax, crit in zip(axes, crits):
        gated = acceptance_series(summary, crit, gated=True)
        for j, (pred, s) in enumerate(acceptance_series(summary, crit).items()):
            slot = 2 * j if gate else j
            line = ax.errorbar(dodge(slot, s["K"]), s["rate"], yerr=_yerr(s["rate"], s["low"], s["high"]),
                               marker="o", capsize=3, label=pred)
            g = gated.get(pred)
            if g:
                ax.errorbar(dodge(slot + 1, g["K"]), g["rate"], yerr=_yerr(g["rate"], g["low"], g["high"]),
                            marker="s", ls="--", capsize=2, color=line[0].get_color(), alpha=0.7,
                            label=f"{pred}, trusted after {gate['K']} stable")
        if len(ks) > 10:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xticks(ks)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("K (training steps predicted ahead)")
        ax.set_title(crit)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("acceptance rate (fraction of predictions)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"extrapolate — {label}: acceptance by K, 95% Wilson intervals")
    return fig


def extrapolate_landscape_figure(plt, summary: dict, label: str):
    """One panel per predictor: the mean over starting checkpoints of L(f) - L(0) against the fraction f of the
    predicted step, one line per K (None without landscape probes). Returns the figure."""
    rows = [r for r in summary["results"] if r.get("landscape")]
    if not rows:
        return None
    preds = [p for p in summary["acceptance"] if any(r["predictor"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(preds), figsize=(4 * len(preds) + 1, 3.8), squeeze=False)
    for ax, pred in zip(axes[0], preds):
        for k in sorted({r["K"] for r in rows if r["predictor"] == pred}):
            mine = [r["landscape"] for r in rows if r["predictor"] == pred and r["K"] == k]
            fr = [0.0, *mine[0]["fractions"]]
            mean = [sum(_num(x) for x in col) / len(mine) for col in
                    zip(*([0.0, *(v - p["loss_at_0"] for v in p["losses"])] for p in mine))]
            ax.plot(fr, mean, marker=".", label=f"K={k} (n={len(mine)})")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.axvline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("fraction f of the predicted step")
        ax.set_title(pred)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("L(f) - L(0), nats (mean)")
    fig.suptitle(f"extrapolate — {label}: held-out loss along the predictions")
    return fig


def plot_extrapolate(summary: dict, out_dir: Path, label: str = "run") -> list[Path]:
    """extrapolate_acceptance.png (rates by K with Wilson intervals, gated rates beside them) and, with the
    landscape probe, extrapolate_landscape.png. ``label`` names the run in the titles. Returns the files."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_save(plt, extrapolate_acceptance_figure(plt, summary, label), out_dir / "extrapolate_acceptance.png")]
    fig = extrapolate_landscape_figure(plt, summary, label)
    if fig is not None:
        written.append(_save(plt, fig, out_dir / "extrapolate_landscape.png"))
    return written
