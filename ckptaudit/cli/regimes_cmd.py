"""`ckptaudit regimes RUN` (SPEC §7, paper 004 sections 2.2-2.3)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession, Progress, render_facts
from ckptaudit.cli.options import (
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    EvalTokensOpt,
    JsonOpt,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    PackOpt,
    PlotOpt,
    ProbesOpt,
    QuietOpt,
    RevisionsOpt,
    RunDirArg,
    SeedOpt,
    SeqLenOpt,
    StepsOpt,
    TaskOpt,
    ThreadsOpt,
    ThresholdsOpt,
)
from ckptaudit.report.console import fmt


@app.command("regimes")
def regimes(
    run_dir: RunDirArg,
    probes: ProbesOpt = None,
    thresholds: ThresholdsOpt = None,
    variance_window: Annotated[
        int, typer.Option("--variance-window", min=2, help="Checkpoints in the sliding window of the activation variance.")
    ] = 5,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap replicates over probes for the uncertainty of s_t and the regimes (0: none; seeded by --seed).")
    ] = 200,
    no_loss: Annotated[
        bool, typer.Option("--no-loss", help="Do not evaluate the validation loss at each checkpoint (no loss curvature).")
    ] = False,
    task: TaskOpt = None,
    data: DataOpt = None,
    seq_len: SeqLenOpt = None,
    pack: PackOpt = False,
    eval_tokens: EvalTokensOpt = 65536,
    steps: StepsOpt = None,
    revisions: RevisionsOpt = None,
    plot: PlotOpt = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Training regimes from activation fingerprints: cosine s_t of consecutive checkpoints' mean-pooled final
    hidden states over a fixed probe set; stable if s_t > HIGH, chaotic if s_t < LOW, transition otherwise. Also
    the windowed activation variance, the loss curvature along the trajectory (validation loss from --task /
    --data, else eval_loss logged in trainer_state.json), and a seeded bootstrap over probes of s_t.

    Example: ckptaudit regimes runs/seeds/seed0 --json
    """
    from ckptaudit import api

    session = LocalSession("regimes", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output = session.output
    with Progress(output, "fingerprints", None, "checkpoints") as hook:
        report = api.regimes(
            run_dir, probes=probes, thresholds=thresholds, variance_window=variance_window, bootstrap=bootstrap,
            loss=not no_loss, task=task, data=data, seq_len=seq_len, pack=pack, eval_tokens=eval_tokens, steps=steps,
            revisions=revisions, seed=seed, dtype=dtype, threads=threads, device=session.device, progress=hook,
            _note=output.note,
        )  # fmt: skip

    def figures(s: dict) -> None:
        from ckptaudit.report.plots import plot_regimes, run_label

        output.note(f"figure written to [bold]{plot_regimes(s, plot, label=run_label(run_dir))}[/bold]")

    session.finish(report.to_hdf5_tree(), report.inputs, report.to_json(),
                   lambda out, s: render_regimes(out, s, str(run_dir)), figures=None if plot is None else figures)


def threshold_line(th: dict) -> str:
    if th["rule"] == "fixed":
        return f"fixed thresholds: low {th['low']:.6g}, high {th['high']:.6g}"
    p = th.get("percentiles", [30, 70])
    return f"adaptive thresholds ({p[0]:g}th / {p[1]:g}th percentiles of s_t): low {th['low']:.6g}, high {th['high']:.6g}"


def render_regimes(output: Any, s: dict, label: str) -> None:
    """Terminal view: one row per checkpoint (s_t with its bootstrap interval, regime and how often the bootstrap
    agrees, activation variance, loss and its curvature), then thresholds and first entries."""
    colour = {"stable": "green", "transition": "yellow", "chaotic": "red", "unknown": "dim"}
    n = len(s["steps"])
    boot = s.get("bootstrap") or {}
    none = [None] * n

    def ci(i: int) -> str | None:
        lo, hi = (boot.get("similarity_ci_low") or none)[i], (boot.get("similarity_ci_high") or none)[i]
        return None if lo is None else f"{fmt(lo)}–{fmt(hi)}"

    rows = [[t, sim, (boot.get("similarity_se") or none)[i], ci(i), f"[{colour[r]}]{r}[/{colour[r]}]",
             (boot.get("regime_agreement") or none)[i], (s.get("activation_variance") or none)[i],
             (s.get("activation_variance_se") or none)[i], (s.get("loss") or none)[i],
             (s.get("loss_curvature") or none)[i]]
            for i, (t, sim, r) in enumerate(zip(s["steps"], s["similarity"], s["regime"], strict=True))]
    level = f"{100 * boot['level']:g}%" if boot else "—"
    output.table(
        f"regimes — {label}",
        ["step", "s_t", "± se", f"{level} interval", "regime", "agreement", f"act. var (W={s.get('variance_window')})",
         "± se", "loss", "curvature"],
        rows,
        caption=f"probes: {s['probes']}; se / interval / agreement: bootstrap over probes "
                f"({boot.get('n_boot', 0)} replicates, seed {boot.get('seed', '—')}; agreement = share of replicates with "
                "the same regime); act. var ± se over probes; curvature = L_t - 2 L_t-1 + L_t-2 "
                f"(loss: {s.get('loss_source') or '—'})",
    )
    output.print(threshold_line(s["thresholds"]))
    th_ci = boot.get("thresholds_ci")
    if th_ci:
        output.print(f"bootstrap {level} intervals of the thresholds: low [{fmt(th_ci['low'][0])}, {fmt(th_ci['low'][1])}], "
                     f"high [{fmt(th_ci['high'][0])}, {fmt(th_ci['high'][1])}]")
    output.print("first entry: " + ", ".join(f"{r} {'—' if v is None else v}" for r, v in s["first_entry"].items()))
    render_facts(output, s)
    for note in s["notes"]:
        output.print(f"note: {note}")
