"""`ckptaudit extrapolate RUN` (SPEC §7, paper 004: speculative weight prediction)."""

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
from ckptaudit.cli.regimes_cmd import threshold_line
from ckptaudit.report.console import fmt


@app.command("extrapolate")
def extrapolate(
    run_dir: RunDirArg,
    predictor: Annotated[
        str,
        typer.Option("--predictor", help="Predictors, comma-separated: linear, quadratic (paper 004's printed coefficient), quadratic-fit (exact parabola), momentum (paper 004's m/sqrt(v+eps)), adam-step."),
    ] = "linear,quadratic,quadratic-fit,momentum,adam-step",
    k: Annotated[str, typer.Option("--K", "-K", help="Prediction horizons in training steps, comma-separated.")] = "5,10,25,50,75,100",
    cascade: Annotated[
        list[str] | None,
        typer.Option("--cascade", help="Chained prediction D:K (D links of K steps, validated at each link); repeatable."),
    ] = None,
    time_steps: Annotated[
        bool,
        typer.Option("--time", help="Time predict+validate against K real training steps from the last checkpoint: the run's own trainer for runs written by ckptaudit, else resume-probe's loop (the run's optimizer state, batch size and schedule) on --data's train windows."),
    ] = False,
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0.0, help="Proximity criterion: accept when |L_hat - L_t| < TOLERANCE * L_t.")
    ] = 0.05,
    sigma_window: Annotated[
        int, typer.Option("--sigma-window", min=1, help="Adaptive criterion: sigma_L = std of the losses of the last N checkpoints.")
    ] = 5,
    skip_chaotic: Annotated[
        bool, typer.Option("--skip-chaotic", help="Predict only from non-chaotic checkpoints (paper 004's protocol).")
    ] = False,
    landscape: Annotated[
        bool, typer.Option("--landscape", help="Probe the loss at 0.25, 0.5, 1, 1.5 and 2 times each predicted step, "
                           "with the directional derivative and curvature: 5 more held-out evaluations per prediction.")
    ] = False,
    confirm_stable: Annotated[
        int | None, typer.Option("--confirm-stable", min=1, metavar="K",
                                 help="Trust a prediction only after K consecutive stable checkpoints (the paper's "
                                      "code uses 2); reports the rates among trusted predictions beside all.")
    ] = None,
    moment_dtype: Annotated[
        str | None, typer.Option("--moment-dtype", help="Store the optimizer moments as float16, bfloat16 or float32 "
                                 "before momentum / adam-step use them (the paper's code keeps them in float16).")
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap replicates over the starting checkpoints for the "
                          "standard errors and 95% intervals of the acceptance rates (0: none; seeded by --seed).")
    ] = 200,
    plot: PlotOpt = None,
    data: DataOpt = None,
    task: TaskOpt = None,
    seq_len: SeqLenOpt = None,
    pack: PackOpt = False,
    eval_tokens: EvalTokensOpt = 65536,
    probes: ProbesOpt = None,
    thresholds: ThresholdsOpt = None,
    steps: StepsOpt = None,
    revisions: RevisionsOpt = None,
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
    """Speculative weight prediction: predict theta(t+K) from each checkpoint (linear, quadratic, momentum,
    adam-step), validate its held-out loss, accept by strict / adaptive / proximity criteria, report rates per
    predictor, K and regime with Wilson and bootstrap intervals, and the error against theta(t+K) where the run
    has it; optionally the loss landscape along each prediction, the K-consecutive-stable gate and the moments
    stored at a lower precision.

    Example: ckptaudit extrapolate fixtures/runs/demo --K 30,60,150 --cascade 4:30 --time
    """
    from ckptaudit import api

    session = LocalSession("extrapolate", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output = session.output
    with Progress(output, "extrapolate", None, "passes") as hook:
        report = api.extrapolate(
            run_dir, predictors=predictor, K=k, cascades=cascade or [], time_steps=time_steps, tolerance=tolerance,
            sigma_window=sigma_window, skip_chaotic=skip_chaotic, data=data, task=task, seq_len=seq_len, pack=pack,
            eval_tokens=eval_tokens, probes=probes, thresholds=thresholds, landscape=landscape,
            confirm_stable=confirm_stable, moment_dtype=moment_dtype, bootstrap=bootstrap, steps=steps,
            revisions=revisions, seed=seed, dtype=dtype, threads=threads, device=session.device, progress=hook,
            _note=output.note,
        )  # fmt: skip

    def figures(summary: dict) -> None:
        from ckptaudit.report.plots import plot_extrapolate, run_label

        written = plot_extrapolate(summary, plot, run_label(run_dir))
        output.note(f"figures written to [bold]{plot}[/bold] ({len(written)} files)")

    session.finish(report.to_hdf5_tree(), report.inputs, report.to_json(),
                   lambda out, s: render_extrapolate(out, s, str(run_dir)), figures=figures if plot is not None else None)


def _rate_cell(rate: float | None, unc: dict | None) -> str | None:
    """"rate (lo–hi)" with the Wilson interval."""
    if rate is None:
        return None
    w = (unc or {}).get("wilson") or [None, None]
    return fmt(rate) if w[0] is None else f"{fmt(rate)} ({fmt(w[0])}–{fmt(w[1])})"


def render_extrapolate(output: Any, s: dict, label: str) -> None:
    """Terminal view: acceptance per predictor and K with intervals, per regime, the gate, the landscape probes,
    the moment rounding, cascades, timing."""
    unc = s.get("acceptance_uncertainty") or {}
    rates_u = unc.get("rates") or {}
    err_u = unc.get("mean_rel_weight_error") or {}
    rows = []
    for pred, by_k in s["acceptance"].items():
        for k, rates in by_k.items():
            cu = rates_u.get(pred, {}).get(k, {})
            eu = err_u.get(pred, {}).get(k) or {}
            rows.append([pred, int(k), s["counts"][pred][k], *(_rate_cell(rates[c], cu.get(c)) for c in
                         ("strict", "adaptive", "proximity")), (cu.get("strict") or {}).get("se"),
                         s["mean_rel_weight_error"][pred][k], eu.get("se")])  # fmt: skip
    boot = unc.get("bootstrap")
    how = (f"bootstrap over the {boot['resampled']} ({boot['n_boot']} replicates, seed {boot['seed']})" if boot
           else "no bootstrap")
    output.table(f"extrapolate — {label}", ["predictor", "K", "n", "strict", "adaptive", "proximity", "± se strict",
                                             "mean rel. weight error", "± se"], rows,
                 caption="acceptance rates (95% Wilson interval); ± se: " + how + "; rel. weight error = "
                         "||theta_hat - theta(t+K)|| / ||theta(t+K) - theta_t||")  # fmt: skip
    reg_rows = []
    for regime, acc in s["acceptance_by_regime"].items():
        for pred, by_k in acc.items():
            reg_rows.append([regime, pred, *(f"{by_k[k]['strict']:.2f}/{by_k[k]['proximity']:.2f}" if k in by_k else None
                                             for k in map(str, s["settings"]["K"]))])  # fmt: skip
    output.table("strict / proximity acceptance by regime", ["regime", "predictor", *(f"K={k}" for k in s["settings"]["K"])], reg_rows)
    gate = s.get("gate")
    if gate:
        g_rows = [[pred, int(k), gate["counts"].get(pred, {}).get(k, 0),
                   *(_rate_cell(r[c], gate["uncertainty"].get(pred, {}).get(k, {}).get(c)) for c in
                     ("strict", "adaptive", "proximity")), gate["applied"][pred][k]["strict"]]
                  for pred, by_k in gate["acceptance"].items() for k, r in by_k.items()]  # fmt: skip
        output.table(f"gate: {gate['rule']}", ["predictor", "K", "trusted n", "strict", "adaptive", "proximity",
                                                "applied (trusted and strict)"], g_rows,
                     caption="trusted from steps: " + (", ".join(map(str, gate["trusted_steps"])) or "none"))  # fmt: skip
    land = s.get("landscape")
    if land:
        fr = land["fractions"]
        l_rows = [[r["step"], r["predictor"], r["K"], "yes" if r["strict"] else "no", r["landscape"]["loss_at_0"],
                   *r["landscape"]["losses"], r["landscape"]["derivative"], r["landscape"]["curvature"],
                   r["landscape"]["reading"]] for r in s["results"] if r.get("landscape")]  # fmt: skip
        output.table("landscape along each prediction", ["step", "predictor", "K", "strict", "L(0)",
                                                          *(f"L({f:g})" for f in fr), "dL/ds", "d2L/ds2", "reading"],
                     l_rows, caption=f"L(f) = loss at theta_t + f (theta_hat - theta_t); s = distance along the step; "
                                     f"{land['cost']} ({land['evaluations']} in all)")  # fmt: skip
    mr = s.get("moment_rounding")
    if mr:
        output.table(f"optimizer moments stored as {mr[0]['dtype']}",
                     ["step", "m flushed to 0", "v flushed to 0", "overflow", "change of m/sqrt(v+eps)",
                      "change of mhat/(sqrt(vhat)+eps)"],
                     [[m["step"], m["m_flushed"], m["v_flushed"], m["nonfinite"], m["momentum_rel_change"],
                       m["adam_rel_change"]] for m in mr],
                     caption="flushed: share of the nonzero entries that round to zero; change: relative, over all "
                             "parameters, of the update direction each moment predictor extrapolates")  # fmt: skip
    if s["cascades"]:
        c_rows = [[spec, pred, c, v["full_chain"], v["mean_depth"]]
                  for spec, preds in s["cascades"]["summary"].items() for pred, crit in preds.items() for c, v in crit.items()]  # fmt: skip
        output.table("cascades (D:K)", ["D:K", "predictor", "criterion", "full chain accepted", "mean accepted links"], c_rows)
    if s["timing"]:
        t = s["timing"]
        t_rows = [[pred, int(k), v, t["train_seconds"].get(k), t["ratio"][pred][k]]
                  for pred, by_k in t["predict_validate_seconds"].items() for k, v in by_k.items()]  # fmt: skip
        output.table(f"predict+validate vs K real steps from step {t['from_step']} ({t['device']})",
                     ["predictor", "K", "predict+validate s", "K steps s", "ratio"], t_rows,
                     caption=f"ratio < 1: predicting and validating is cheaper than training K steps; the steps: "
                             f"{t['loop']}, batch {t['batch_size']} ({t['batch_size_source']})")  # fmt: skip
    output.print(threshold_line(s["regimes"]["thresholds"]))
    render_facts(output, s)
    for note in s["notes"]:
        output.print(f"note: {note}")
