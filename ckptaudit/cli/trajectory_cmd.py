"""`ckptaudit regimes RUN`, `ckptaudit extrapolate RUN`, `ckptaudit cross-seed RUN RUN ...` (SPEC §7, paper 004)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession, Progress, load_run, render_facts
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
    QuietOpt,
    RevisionsOpt,
    RunDirArg,
    SeedOpt,
    SeqLenOpt,
    StepsOpt,
    TaskOpt,
    ThreadsOpt,
)
from ckptaudit.errors import LayoutError, UsageError
from ckptaudit.report.console import fmt

ProbesOpt = Annotated[
    Path | None,
    typer.Option(
        "--probes",
        help="Probe file, one probe per line (text when the checkpoint has a tokenizer, else token ids). "
        "Default: the package's 100 probe texts (ckptaudit/data/probes.txt) with a tokenizer; the task's own fixed inputs without one.",
    ),
]
ThresholdsOpt = Annotated[
    str | None,
    typer.Option(
        "--thresholds",
        help="Fixed regime thresholds LOW,HIGH on s_t (e.g. 0.997,0.9995). Default: adaptive, the 30th/70th percentiles of s_t.",
    ),
]
def _data(ckpt: Any, task: str | None, data: Path | None, required: bool, windows: Any = None) -> Any:
    """The Task-protocol data of ``ckpt`` (None when not required and the checkpoint names none)."""
    from ckptaudit.tasks import TASK_FILE
    from ckptaudit.tasks.data import load_data

    if not required and task is None and data is None and not (ckpt.directory / TASK_FILE).is_file():
        return None
    return load_data(ckpt, task=task, data=data, windows=windows)


def _precision(dtype: str, ckpt: Any, device: str) -> tuple[Any, dict]:
    from ckptaudit.io.precision import resolve_dtype

    torch_dtype, record = resolve_dtype(dtype, ckpt, device)
    return torch_dtype, record.to_json()


def _probes(ckpt: Any, probes: Path | None, data: Any, seed: int) -> Any:
    from ckptaudit.analyses.regimes import build_probes

    return build_probes(ckpt.directory, ckpt.config(), probes, data, seed)


def _run(path: Path, steps: str | None = None, revisions: str | None = None) -> Any:
    run = load_run(path, steps, revisions)
    if len(run) < 2:
        raise LayoutError(f"{path}: {len(run)} checkpoint(s); trajectory analyses need at least 2", "pass a run directory")
    return run


def _int_list(spec: str, option: str) -> tuple[int, ...]:
    from ckptaudit.io.numbers import is_int_text, parse_int

    parts = [x.strip() for x in spec.split(",") if x.strip()]
    if not parts or not all(is_int_text(x) for x in parts):
        raise UsageError(f"{option} {spec}: expected comma-separated integers", f"e.g. {option} 5,10,25")
    values = tuple(parse_int(x, option, hint=f"e.g. {option} 5,10,25") for x in parts)
    if min(values) < 1:
        raise UsageError(f"{option} {spec}: give positive integers", f"e.g. {option} 5,10,25")
    return values


def _cascades(specs: list[str]) -> tuple[tuple[int, int], ...]:
    out = []
    for spec in specs:
        from ckptaudit.io.numbers import is_int_text, parse_int

        d, _, k = (x.strip() for x in spec.partition(":"))
        if not (is_int_text(d) and is_int_text(k)):
            raise UsageError(f"--cascade {spec}: expected D:K", "e.g. --cascade 4:25")
        out.append((parse_int(d, "--cascade"), parse_int(k, "--cascade")))
        if out[-1][0] < 1 or out[-1][1] < 1:
            raise UsageError(f"--cascade {spec}: D and K must be positive", "e.g. --cascade 4:25")
    return tuple(out)


# ------------------------------------------------------------------------------------------- regimes


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
    summary = report.to_json()
    session.save_report(report.to_hdf5_tree(), report.inputs, summary=summary)
    output.json(summary)
    if plot is not None:
        from ckptaudit.report.plots import plot_regimes, run_label

        output.note(f"figure written to [bold]{plot_regimes(summary, plot, label=run_label(run_dir))}[/bold]")
    if output.human:
        render_regimes(output, summary, str(run_dir))


def _regime_losses(run: Any, held_out: Any, data: Path | None, no_loss: bool) -> tuple[Any, Any, str]:
    """(evaluate, logged losses, source): the held-out validation loss evaluated per checkpoint when data is at hand,
    else the eval_loss that trainer_state.json logged at each checkpoint's step, else nothing."""
    from ckptaudit.analyses.regimes_signals import losses_from_log_history

    if no_loss:
        return None, None, "no loss: --no-loss"
    if held_out is not None:
        name = f"--data {data}" if data is not None else f"task {getattr(held_out, 'name', 'of the checkpoint')}"
        return (lambda m: float(held_out.evaluate(m, "validation")[0])), None, f"validation loss on {name}, evaluated at every checkpoint"
    for ckpt in reversed(list(run)):
        state = ckpt.trainer_state()
        if state and state.get("log_history"):
            logged = losses_from_log_history(state["log_history"], [c.step for c in run])
            if any(v is not None for v in logged):
                missing = sum(v is None for v in logged)
                return None, logged, ("eval_loss logged in trainer_state.json" +
                                      (f" ({missing} checkpoint(s) without one)" if missing else ""))
            break
    return None, None, ""


def _threshold_line(th: dict) -> str:
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
    output.print(_threshold_line(s["thresholds"]))
    th_ci = boot.get("thresholds_ci")
    if th_ci:
        output.print(f"bootstrap {level} intervals of the thresholds: low [{fmt(th_ci['low'][0])}, {fmt(th_ci['low'][1])}], "
                     f"high [{fmt(th_ci['high'][0])}, {fmt(th_ci['high'][1])}]")
    output.print("first entry: " + ", ".join(f"{r} {'—' if v is None else v}" for r, v in s["first_entry"].items()))
    render_facts(output, s)
    for note in s["notes"]:
        output.print(f"note: {note}")


# --------------------------------------------------------------------------------------- extrapolate


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
        typer.Option("--time", help="Time predict+validate against K real training steps from the last checkpoint (runs written by ckptaudit's trainer)."),
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
    summary = session.finish(report.to_hdf5_tree(), report.inputs, report.to_json(),
                             lambda out, s: render_extrapolate(out, s, str(run_dir)))
    if plot is not None:
        from ckptaudit.report.plots import plot_extrapolate

        written = plot_extrapolate(summary, plot, str(run_dir))
        output.note(f"figures written to [bold]{plot}[/bold] ({len(written)} files)")


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
                     caption="ratio < 1: predicting and validating is cheaper than training K steps")  # fmt: skip
    output.print(_threshold_line(s["regimes"]["thresholds"]))
    render_facts(output, s)
    for note in s["notes"]:
        output.print(f"note: {note}")


# ---------------------------------------------------------------------------------------- cross-seed


@app.command("cross-seed")
def cross_seed(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories of the same recipe with different seeds.")],
    probes: ProbesOpt = None,
    thresholds: ThresholdsOpt = None,
    task: TaskOpt = None,
    data: DataOpt = None,
    seq_len: SeqLenOpt = None,
    pack: PackOpt = False,
    eval_tokens: EvalTokensOpt = 65536,
    steps: StepsOpt = None,
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
    """Cross-seed convergence: final-loss coefficient of variation, first step of each regime per seed and its
    std, regime agreement at matched steps, and linear CKA between the seeds' probe representations.

    Example: ckptaudit cross-seed runs/seeds/seed0 runs/seeds/seed1 runs/seeds/seed2
    """
    from ckptaudit import api

    if len(run_dirs) < 2:
        raise UsageError("cross-seed needs at least two runs", "e.g. ckptaudit cross-seed runs/seed0 runs/seed1")
    session = LocalSession("cross-seed", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output = session.output
    with Progress(output, "fingerprints", None, "checkpoints") as hook:
        report = api.cross_seed(
            run_dirs, probes=probes, thresholds=thresholds, task=task, data=data, seq_len=seq_len, pack=pack,
            eval_tokens=eval_tokens, steps=steps, seed=seed, dtype=dtype, threads=threads, device=session.device,
            progress=hook, _note=output.note,
        )  # fmt: skip
    session.finish(report.to_hdf5_tree(), report.inputs, report.to_json(), render_cross_seed)


def render_cross_seed(output: Any, s: dict) -> None:
    """Terminal view: per-seed first entries and final loss, then the cross-seed statistics and CKA."""
    from ckptaudit.analyses.regimes import REGIMES

    rows = [[x["label"], x["final_loss"], x.get("final_loss_source"), *(x["first_entry"][r] for r in REGIMES)]
            for x in s["seeds"]]
    rows.append(["std across seeds", None, None, *(s["first_entry_std"][r] for r in REGIMES)])
    output.table("cross-seed — first entry step per regime", ["seed", "final loss", "loss from", *REGIMES], rows,
                 caption=f"probes: {s['probes']}")
    cka = s["cka"]
    output.table("linear CKA of probe representations at matched steps", ["step", "mean CKA over seed pairs"],
                 list(zip(cka["steps"], cka["mean"], strict=True)))  # fmt: skip
    cv = s["loss_cv"]
    output.print(f"final-loss coefficient of variation: {'—' if cv is None else f'{100 * cv:.3g}%'}")
    agree = s["regime_agreement"]
    output.print(f"regime agreement (all seeds, matched steps): {'—' if agree is None else f'{100 * agree:.3g}%'}")
    output.print(_threshold_line(s["thresholds"]) + " (pooled over seeds)" * (s["thresholds"]["rule"] == "adaptive"))
    render_facts(output, s)
    for note in s["notes"]:
        output.print(f"note: {note}")
