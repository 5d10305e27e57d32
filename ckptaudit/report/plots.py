"""Optional PNG figures (matplotlib, the `plot` extra). Commands call these with their JSON summaries."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from ckptaudit.errors import UsageError

#: Sizes for figures that go into a paper at their printed width (6.5-7 in): 9 pt text, 8 pt legends.
_STYLE = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
          "legend.fontsize": 8, "figure.titlesize": 10, "lines.linewidth": 1.4, "savefig.bbox": "tight"}
_KEPT: dict | None = None  # path -> Figure while keep_figures() is active


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib", "pip install 'ckptaudit[plot]'") from None
    plt.rcParams.update(_STYLE)
    return plt


def _save(plt, fig, path: Path, dpi: int = 200) -> Path:
    """Lay out, write and close ``fig`` (kept open instead inside :func:`keep_figures`); returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    if _KEPT is not None:
        _KEPT[Path(path)] = fig
    else:
        plt.close(fig)
    return path


def plot_backbone(summary: dict, out_dir: Path, label: str | None = None) -> list[Path]:
    """a(t) and ||r(t)|| per parameter set, the rho spectrum, and C(t). ``label`` names the run in the titles
    (e.g. :func:`run_label` of the run directory). Returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = summary["steps"]
    run = f"{label}: " if label else ""
    sets = {"trunk": summary["trunk"]}
    sets.update({f"group_{g}": r for g, r in summary.get("groups", {}).items()})
    sets.update({f"block_{b}": r for b, r in summary.get("blocks", {}).items()})
    written = []
    for name, r in sets.items():
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        ax.plot(steps, r["a"], marker=".", label="a(t) backbone coordinate")
        ax.plot(steps, r["r_norm"], marker=".", label="‖r(t)‖ transverse residual")
        _mark_steps(ax, _backbone_marks(summary, r))
        _step_axis(ax)
        ax.set_ylabel("weight-space distance (parameter units)")
        ax.set_title(f"{run}{name} — backbone vs residual (anchor step {summary['anchor_step']})")
        ax.legend()
        written.append(_save(plt, fig, out_dir / f"backbone_{name}_a_r.png"))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, r in sets.items():
        ax.semilogy(range(1, len(r["rho"]) + 1), [max(x, 1e-16) for x in r["rho"]], marker="o", ms=3, label=name)
    ax.set_xlabel("principal component k")
    ax.set_ylabel("explained variance ρ_k (fraction of trace G)")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_title(f"{run}explained variance spectrum")
    ax.legend(ncol=2 if len(sets) > 6 else 1)
    written.append(_save(plt, fig, out_dir / "backbone_rho.png"))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    c = summary["trunk"]["update_alignment"]
    ax.plot(steps[len(steps) - len(c):], c, marker=".", label="C(t)")
    ax.axhline(0, color="grey", lw=0.5)
    _mark_steps(ax, _backbone_marks(summary, summary["trunk"]))
    _step_axis(ax)
    ax.set_ylabel("cosine C(t) of update and backbone")
    ax.set_title(f"{run}trunk — update-direction alignment with the backbone")
    ax.legend()
    written.append(_save(plt, fig, out_dir / "backbone_update_alignment.png"))
    written += _plot_backbone_dynamics(plt, summary, out_dir, run)
    return written


def _plot_backbone_dynamics(plt, summary: dict, out_dir: Path, run: str = "") -> list[Path]:
    """Window stability vs rotation, a(t) on the raw and row-normalised backbones, and the log-log fits (trunk)."""
    t, steps, written = summary["trunk"], summary["steps"], []
    W = summary["settings"]["window"]
    marks = _backbone_marks(summary, t)
    if t.get("window_alignment"):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        ax.plot(steps[: len(t["window_alignment"])], t["window_alignment"], marker=".", label="c(w) vs global backbone")
        rot = t.get("window_rotation") or []
        ax.plot(t["window_rotation_start_step"], rot, marker=".", label="rotation |cos| window w vs w+1")
        ax.plot(t["window_rotation_start_step"], t.get("local_window_rotation") or [], marker=".", ls="--",
                label="local rotation (re-anchored, unit rows)")
        _mark_steps(ax, marks)
        _step_axis(ax, f"first training step of window w ({W} checkpoints)")
        ax.set_ylabel("|cos| (PC1 alignment)")
        ax.set_title(f"{run}trunk — window PC1 stability")
        ax.legend()
        written.append(_save(plt, fig, out_dir / "backbone_window_rotation.png"))
    if t.get("a_rownorm"):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        ax.plot(steps, t["a"], label="a(t), raw backbone")
        ax.plot(steps, t["a_rownorm"], ls="--", label="a(t), row-normalised backbone")
        ax.plot(steps, t["r_norm"], label="‖r(t)‖, raw backbone")
        ax.plot(steps, t["r_norm_rownorm"], ls="--", label="‖r(t)‖, row-normalised backbone")
        _mark_steps(ax, marks)
        _step_axis(ax)
        ax.set_ylabel("weight-space distance (parameter units)")
        ax.set_title(f"{run}trunk — raw vs row-normalised backbone")
        ax.legend()
        written.append(_save(plt, fig, out_dir / "backbone_a_raw_rownorm.png"))
    fits = [(k, t.get(f"loglog_{k}")) for k in ("a", "r_norm")]
    if any(f for _, f in fits):
        anchor = summary["anchor_step"]
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for key, fit in fits:
            pts = [(s - anchor, abs(v)) for s, v in zip(steps, t[key]) if v and s > anchor]
            if not pts or not fit:
                continue
            name = "|a|" if key == "a" else "‖r‖"
            line = ax.loglog(*zip(*pts), marker=".", ls="", label=f"{name} ~ τ^{fit['slope']:.3g}")[0]
            lo, hi = fit["first_step"] - anchor, fit["last_step"] - anchor
            ax.loglog([lo, hi], [10 ** (fit["intercept"] + fit["slope"] * math.log10(x)) for x in (lo, hi)],
                      color=line.get_color())
        ax.set_xlabel("τ = training steps since the anchor")
        ax.set_ylabel("|a(t)|, ‖r(t)‖ (parameter units)")
        ax.set_title(f"{run}trunk — power-law fits (anchor step {anchor})")
        ax.legend()
        written.append(_save(plt, fig, out_dir / "backbone_loglog.png"))
    return written


def plot_finetune(summary: dict, out_dir: Path, label: str | None = None) -> list[Path]:
    """One PNG per run: Phi, S, D (left axis) and the CE loss (right axis) against the step, the flip step marked.
    ``label`` names the model in the titles. Returns the files."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = f"{label}: " if label else ""
    written = []
    for i, c in enumerate(summary["contexts"]):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        t = range(len(c["phi"]))
        ax.plot(t, c["phi"], label="Φ Born gap", lw=2)
        ax.plot(t, c["signal"], label="signal S", ls="--")
        ax.plot(t, c["drag"], label="drag D", ls=":")
        ax.axhline(0.0, color="grey", lw=0.6)
        if c["flip_step"] is not None:
            _mark_steps(ax, [(c["flip_step"], f"flip, Φ > 0 (step {c['flip_step']})", "tab:red", "-")])
        ax2 = ax.twinx()
        ax2.plot(t, c["loss"], color="black", alpha=0.45, label="cross-entropy loss")
        ax2.set_ylabel("cross-entropy loss (nats)")
        _step_axis(ax, "fine-tuning step")
        ax.set_ylabel("Born probability difference")
        ax.set_title(f"{run}{c['target'].strip()} vs {c['competitor'].strip()} — {c['mode']}, lr {c['lr']:g}")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="best")
        safe = "".join(ch if ch.isalnum() else "_" for ch in c["target"].strip()) or "target"
        written.append(_save(plt, fig, out_dir / f"finetune_{i:03d}_{safe}_lr{c['lr']:g}.png"))
    return written


def plot_resume(summary: dict, out_dir: Path, label: str | None = None) -> Path:
    """resume_probe_loss_accuracy.png: evaluation loss (nats, left) beside evaluation accuracy (%, right) over the resumed
    optimizer steps, one line per condition (same colour in both panels), each collapse step marked. ``label``
    names the checkpoint in the title (default: :func:`run_label` of the summary's checkpoint)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(7.0, 3.4), sharex=True)
    losses = [v for c in summary["conditions"] for v in c["eval_loss"] if v is not None and math.isfinite(v)]
    decades = bool(losses) and min(losses) > 0 and max(losses) > 10 * min(losses)  # log axis only over decades
    for k, c in enumerate(summary["conditions"]):
        style = "-" if c["optimizer"] == "preserved" else "--"
        colour = f"C{k % 10}"
        name = f"{c['name']} ({c['verdict']})"
        ax_loss.plot(c["steps"], _nan(c["eval_loss"]), style, color=colour, marker=".", label=name)
        ax_acc.plot(c["steps"], [100.0 * v for v in _nan(c["eval_acc"])], style, color=colour, marker=".", label=name)
        if c.get("collapse_step") is not None:
            for ax in (ax_loss, ax_acc):
                text = f"collapse of {c['name']} (step {c['collapse_step']})"
                ax.axvline(c["collapse_step"], color=colour, ls=":", lw=1.0, label=text if ax is ax_acc else "_" + text)
    if decades:
        ax_loss.set_yscale("log")
    what = f"resumed optimizer steps after step {summary['start_step']}"
    for ax in (ax_loss, ax_acc):
        _step_axis(ax, what)
    ax_loss.set_ylabel("evaluation loss (nats)")
    ax_acc.set_ylabel("evaluation accuracy (%)")
    lo, hi = ax_acc.get_ylim()
    ax_acc.set_ylim(max(lo, -2.0), min(hi, 102.0))
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    name = label or run_label(summary.get("checkpoint") or "", checkpoint=True)
    fig.suptitle(f"resume-probe — {name} (step {summary['start_step']}): preserved vs reset optimizer state")
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(2, len(labels)))
    return _save(plt, fig, out_dir / "resume_probe_loss_accuracy.png")


def plot_embeddings(summary: dict, out_dir: Path, label: str | None = None) -> list[Path]:
    """embeddings_<matrix>_overlaps.png per matrix (``embed``, and ``head`` when untied): the histogram of the
    squared overlaps s = c² as a probability density (``histogram_c2`` of the summary: counts / (pairs x bin
    width)) against the two laws the class is decided by, the Gaussian with the mean and std of s and the
    exponential with scale = mean of s, each with its KS distance; on a linear density axis up to the 99th
    percentile of s (left) and on a log axis over the whole histogram (right: a Gaussian bends down, an
    exponential is a straight line). ``label`` names the model. Returns the files."""
    from scipy import stats as sps

    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    matrices = {"embed": summary, **({"head": summary["head"]} if summary.get("head") else {})}
    for role, s in matrices.items():
        hist = s["histogram_c2"]
        edges, counts = hist["edges"], hist["counts"]
        total = sum(counts) + hist["above"]
        density = [n / (total * (b - a)) for n, a, b in zip(counts, edges[:-1], edges[1:], strict=True)]
        fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.3))
        x = [edges[-1] * i / 400 for i in range(401)]
        m, sd = s["mean_c2"], s["std_c2"]
        q99 = (s.get("quantiles_c2") or {}).get("0.99")
        for ax in axes:
            ax.stairs(density, edges, fill=True, color="0.78",
                      label=f"s over {s['pairs']:,} {'pairs (all)' if s['exact'] else 'sampled pairs'}")
            ax.stairs(density, edges, color="0.35", lw=0.7)
            if sd > 0:
                ax.plot(x, sps.norm.pdf(x, loc=m, scale=sd), color="tab:blue", lw=1.6,
                        label=f"Gaussian fit (mean {m:.3g}, std {sd:.3g}), KS = {s['ks_gauss']:.3g}")
            if m > 0:
                ax.plot(x, sps.expon.pdf(x, loc=0.0, scale=m), color="tab:orange", lw=1.6, ls="--",
                        label=f"exponential fit (scale = mean {m:.3g}), KS = {s['ks_exp']:.3g}")
            ax.set_xlabel("squared cosine overlap s = c² (dimensionless)")
            ax.set_ylabel("probability density (per unit s)")
        axes[0].set_xlim(0.0, q99 if q99 and 0 < q99 < edges[-1] else edges[-1])
        axes[0].set_title("bulk (up to the 99th percentile)" if q99 and q99 < edges[-1] else "bulk")
        positive = [d for d in density if d > 0]
        axes[1].set_yscale("log")
        if positive:
            axes[1].set_ylim(0.3 * min(positive), 3.0 * max(positive))
        axes[1].set_xlim(0.0, edges[-1])
        axes[1].set_title(f"tail, log scale ({100.0 * hist['above'] / total:.2g}% of pairs beyond s = {edges[-1]:.3g})")
        kind = "dense Gaussian bulk" if s["class"] == "A" else "sparse exponential bulk"
        matrix = "input embedding" if role == "embed" else "LM head"
        fig.suptitle(f"{label + ' — ' if label else ''}{matrix}\nclass {s['class']} ({kind}), "
                     f"bulk index KS_exp − KS_gauss = {s['bulk_index']:.3g}")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.tight_layout()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2)
        written.append(_save(plt, fig, out_dir / f"embeddings_{role}_overlaps.png"))
    return written


#: Shading of the regimes in plot_regimes.
REGIME_COLOURS = {"stable": "tab:green", "transition": "gold", "chaotic": "tab:red"}


def plot_regimes(summary: dict, out_dir: Path, label: str | None = None) -> Path:
    """regimes.png: s_t (cosine of consecutive fingerprints) against the training step with its bootstrap interval,
    the low / high thresholds as horizontal lines, and the interval from the previous checkpoint to each
    checkpoint shaded by that checkpoint's regime; below it the loss per checkpoint when the summary has one.
    ``label`` names the run. Returns the file."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps, sim = summary["steps"], _nan(summary["similarity"])
    loss = summary.get("loss")
    has_loss = bool(loss) and any(v is not None and math.isfinite(v) for v in loss)
    fig, axes = plt.subplots(2 if has_loss else 1, 1, figsize=(6.5, 5.0 if has_loss else 3.6), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [2, 1]} if has_loss else None)
    ax = axes[0][0]
    shaded: set[str] = set()
    for i in range(1, len(steps)):
        r = summary["regime"][i]
        if r in REGIME_COLOURS:
            ax.axvspan(steps[i - 1], steps[i], color=REGIME_COLOURS[r], alpha=0.18, lw=0, gid=f"regime:{r}",
                       label=None if r in shaded else f"{r} regime")
            shaded.add(r)
    boot = summary.get("bootstrap") or {}
    lo, hi = boot.get("similarity_ci_low"), boot.get("similarity_ci_high")
    if lo and hi:
        ax.fill_between(steps, _nan(lo), _nan(hi), color="tab:blue", alpha=0.25, lw=0,
                        label=f"{100 * boot['level']:g}% bootstrap interval")
    ax.plot(steps, sim, marker=".", color="tab:blue", label="s_t = cos(fingerprint t, t−1)")
    th = summary["thresholds"]
    if th["rule"] == "fixed":
        names = ("low threshold (fixed)", "high threshold (fixed)")
    else:
        p = th.get("percentiles") or [30, 70]
        names = (f"low threshold ({p[0]:g}th percentile)", f"high threshold ({p[1]:g}th percentile)")
    for value, name, ls in ((th["low"], names[0], "--"), (th["high"], names[1], "-.")):
        if value is not None and math.isfinite(value):
            ax.axhline(value, color="black", ls=ls, lw=1.0, label=f"{name} = {value:.6g}")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_ylabel("cosine similarity s_t")
    ax.set_title(f"{label + ': ' if label else ''}training regimes from activation fingerprints")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if has_loss:
        lx = axes[1][0]
        lx.plot(steps, _nan(loss), marker=".", color="black")
        lx.set_ylabel("loss (nats)")
        lx.set_title(summary.get("loss_source") or "loss", fontsize=8)
    _step_axis(axes[-1][0])
    return _save(plt, fig, out_dir / "regimes.png")


def plot_slack(summary: dict, out_dir: Path, label: str | None = None) -> Path:
    """gxs_slack.png: heat maps over the (alpha, sigma) grid, rows alpha, columns sigma: accuracy (%) and mean
    margin z_correct - max other (logits), each cell written out, each with a labelled colour bar; rows where the
    margin falls monotonically with sigma ("no gain reflex") are marked in the row labels. ``label`` names the
    checkpoint (default: :func:`run_label` of the summary's checkpoint). Returns the file."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acc = [[100.0 * v for v in _nan(row)] for row in summary["accuracy"]]
    margin = [_nan(row) for row in summary["margin"]]
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 0.45 * len(acc) + 2.0))
    flat = [abs(v) for row in margin for v in row if math.isfinite(v)]
    bound = max(flat) if flat and max(flat) > 0 else 1.0
    panels = ((axes[0], acc, "accuracy (%)", "viridis", None, None),
              (axes[1], margin, "mean margin z_correct − max other (logits)", "RdBu", -bound, bound))
    for ax, grid, what, cmap, vmin, vmax in panels:
        im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        bar = fig.colorbar(im, ax=ax)
        bar.set_label(what)
        ax.set_xticks(range(len(summary["sigma"])), [f"{x:g}" for x in summary["sigma"]])
        ax.set_yticks(range(len(summary["alpha"])), [f"{a:g}" for a in summary["alpha"]])
        ax.set_xlabel("noise level σ (× RMS of the residual)")
        ax.set_ylabel("residual scale α")
        lo, hi = im.get_clim()
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                u = (v - lo) / (hi - lo) if hi > lo else 0.5  # where the cell sits on the colour bar
                dark = abs(u - 0.5) > 0.3 if cmap == "RdBu" else u < 0.5
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    axes[0].set_title("accuracy")
    reflex = [a for a, ok in zip(summary["alpha"], summary["no_gain_reflex"], strict=True) if ok]
    axes[1].set_title("mean margin" + (f" (no gain reflex at α = {', '.join(f'{a:g}' for a in reflex)})" if reflex else ""))
    name = label or run_label(summary.get("checkpoint") or "", checkpoint=True)
    fig.suptitle(f"gxs slack — {name}: h' = α·h + σ·rms(h)·ε at {summary['site']} (n = {summary['n']})")
    return _save(plt, fig, out_dir / "gxs_slack.png")


# ----------------------------------------------------------------------------------------- shared pieces


def run_label(path: str | Path, checkpoint: bool = False, width: int = 40) -> str:
    """A short name of a run for figure titles: the folder name (with ``checkpoint``, the run folder and the
    checkpoint folder, ``seed0/checkpoint-60``; a snapshot of the hub cache, its ``org/name``), cut in the middle
    to at most ``width`` characters."""
    import os

    if not str(path):
        return ""
    p = Path(os.path.abspath(path))
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):  # the hub cache: org/name
        name = p.parent.parent.name[len("models--"):].replace("--", "/")
    else:
        name = f"{p.parent.name}/{p.name}" if checkpoint and p.parent.name else p.name
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 2] + "…" + name[len(name) - (keep - keep // 2):]


@contextmanager
def keep_figures():
    """Inside the block the figures the plot functions write stay open and are collected: yields a dict
    {file path: matplotlib Figure} (for reading back the plotted data); they are closed on exit."""
    global _KEPT
    previous, _KEPT = _KEPT, {}
    kept = _KEPT
    try:
        yield kept
    finally:
        _KEPT = previous
        if kept:
            import matplotlib.pyplot as plt

            for fig in kept.values():
                plt.close(fig)


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10])


def _step_axis(ax, what: str = "training step") -> None:
    """Label the x axis with ``what`` and put its ticks on integers (steps are counts)."""
    ax.set_xlabel(what)
    ax.xaxis.set_major_locator(_integer_locator())


def _nan(values) -> list[float]:
    """None (JSON's NaN) as NaN, so that matplotlib leaves a gap."""
    return [math.nan if v is None else float(v) for v in values]


def _mark_steps(ax, marks) -> None:
    """Vertical lines at ``marks``: (step, legend label, colour, line style) each; one legend entry per label (the
    repeats carry it behind a leading "_", which legends skip)."""
    seen: set[str] = set()
    for step, text, colour, ls in marks:
        ax.axvline(step, color=colour, ls=ls, lw=1.0, label="_" + text if text in seen else text)
        seen.add(text)


def _backbone_marks(summary: dict, r: dict) -> list[tuple]:
    """The anchor, every --switch PEAK:TROUGH and the sign-flip step t* of parameter set ``r`` as marks."""
    marks = [(summary["anchor_step"], f"anchor (step {summary['anchor_step']})", "0.4", ":")]
    for k, sw in enumerate(summary.get("switch") or []):
        text = f"switch {k + 1}: peak {sw['peak']} → trough {sw['trough']}"
        marks += [(sw["peak"], text, "tab:red", "--"), (sw["trough"], text, "tab:red", "--")]
    if r.get("sign_flip_step") is not None:
        marks.append((r["sign_flip_step"], f"t* sign flip of C (step {r['sign_flip_step']})", "tab:purple", "-."))
    return marks


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
    _step_axis(ax)
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
    _step_axis(ax)
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
        _step_axis(bottom)
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
