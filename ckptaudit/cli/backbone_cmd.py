"""`ckptaudit backbone RUN`: uncentered drift-matrix SVD of a training trajectory (SPEC §1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import Progress, Session
from ckptaudit.cli.options import (
    AllowPartialTrunkOpt,
    DeviceOpt,
    JsonOpt,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    PlotOpt,
    QuietOpt,
    RevisionsOpt,
    RoleMapOpt,
    RunDirArg,
    StepsOpt,
    check_output_file,
)
from ckptaudit.errors import UsageError
from ckptaudit.report.console import fmt, sparkline

_MAX_BLOCK = 100_000  # far above any model's depth; bounds what a range like 0-99999999999 may ask for


def parse_blocks(spec: str | None) -> list[int] | None:
    """'0,2,5' or '0-3' -> block indices."""
    if spec is None:
        return None
    from ckptaudit.io.numbers import parse_int

    out: list[int] = []
    bad = UsageError(f"--blocks {spec}: expected block indices like 0,2,5 or 0-3", None)
    for part in spec.split(","):
        part = part.strip()
        pieces = [x.strip() for x in part.split("-")] if "-" in part else [part]
        if not part:
            continue
        if len(pieces) > 2 or not all(x.isascii() and x.isdigit() for x in pieces):
            raise bad
        lo, hi = (parse_int(x, "--blocks", maximum=_MAX_BLOCK) for x in (pieces[0], pieces[-1]))
        if lo > hi:
            raise UsageError(f"--blocks {spec}: range {part} runs backwards", f"write {hi}-{lo}")
        out.extend(range(lo, hi + 1))
    if not out:
        raise UsageError(f"--blocks {spec!r}: selects no block", "e.g. --blocks 0,2,5 or --blocks 0-3")
    return out


def parse_fit_range(spec: str | None) -> tuple[int, int] | None:
    """'LO:HI' -> (lo, hi) steps, lo < hi."""
    if spec is None:
        return None
    try:
        lo, hi = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UsageError(f"--fit-range {spec}: expected LO:HI as two step numbers", "e.g. --fit-range 1000:9000") from None
    if lo >= hi:
        raise UsageError(f"--fit-range {spec}: LO must be below HI", "e.g. --fit-range 1000:9000")
    return lo, hi


@app.command()
def backbone(
    run_dir: RunDirArg,
    steps: StepsOpt = None,
    revisions: RevisionsOpt = None,
    anchor: Annotated[
        int | None, typer.Option("--anchor", help="Step of the anchor checkpoint (default: the first checkpoint of the run).")
    ] = None,
    blocks: Annotated[
        str | None, typer.Option("--blocks", help="Blocks to analyse one by one, e.g. 0,2,5 or 0-3 (default: all).")
    ] = None,
    include_bias: Annotated[bool, typer.Option("--include-bias", help="Include attention/MLP biases in the trunk.")] = False,
    window: Annotated[int, typer.Option("--window", min=2, help="Rows per rolling window for the stability c(w).")] = 10,
    normalize_rows: Annotated[
        bool, typer.Option("--normalize-rows", help="Analyse unit-normalised drift rows x(t)/||x(t)|| as well.")
    ] = False,
    switch: Annotated[
        list[str] | None,
        typer.Option("--switch", help="A switching direction PEAK:TROUGH given by two checkpoint steps (repeatable)."),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option("--metric", help="Detect switches as adjacent local max/min of this trainer_state.json log_history metric."),
    ] = None,
    save_vectors: Annotated[
        Path | None,
        typer.Option("--save-vectors", callback=check_output_file,
                     help="Write the top right singular vectors V_1..V_k as safetensors keyed by tensor name."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many singular vectors --save-vectors writes.")] = 6,
    fit_range: Annotated[
        str | None,
        typer.Option("--fit-range", metavar="LO:HI",
                     help="Steps (inclusive) of the power-law fits of a(t) and ||r(t)|| (default: every row after the anchor)."),
    ] = None,
    plot: PlotOpt = None,
    role_map: RoleMapOpt = None,
    allow_partial_trunk: AllowPartialTrunkOpt = False,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Streaming SVD of the drift matrix X (rows theta(t) - theta(anchor)) for the trunk, each block and the role
    groups G (q,k) and S (v,o,mlp): spectrum, backbone coordinate, residual, rolling stability, rotation of the
    window PC1, speeds and power-law exponents of a(t) and ||r(t)||, update alignment, switching directions and
    their capture by PC2..PCk, velocities. Reads every tensor byte once; memory does not grow with model size.

    Example: ckptaudit backbone runs/seed42/ --save-vectors backbone.safetensors
    """
    from ckptaudit import api

    with Session("backbone", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash) as session:
        output, main = session.output, session.main
        with Progress(output, "backbone: reading checkpoints", None, "tensor reads") as hook:
            report = api.backbone(
                run_dir, steps=steps, revisions=revisions, anchor=anchor, blocks=blocks, include_bias=include_bias,
                window=window, normalize_rows=normalize_rows, switches=switch or [], metric=metric,
                save_vectors=save_vectors, top_k=top_k, fit_range=fit_range, role_map=role_map,
                allow_partial_trunk=allow_partial_trunk, device=session.device, progress=hook if main else None,
                _note=output.note,
            )  # fmt: skip
    if not main:
        return

    def figures_and_notes(summary: dict) -> None:
        """The --plot figures, then what the human view should know first (vectors, partial trunk, window)."""
        if plot is not None:
            from ckptaudit.report.plots import plot_backbone, run_label

            written = plot_backbone(summary, plot, label=run_label(run_dir))
            output.note(f"figures written to [bold]{plot}[/bold] ({len(written)} files)")
        if save_vectors is not None:
            output.note(f"backbone vectors written to [bold]{save_vectors}[/bold]")
        missing = summary["settings"].get("missing_trunk") or []
        if missing:
            output.note(f"[yellow]partial trunk[/yellow] ({summary['settings']['architecture']}): {'; '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''}")
        unplaced = summary["settings"].get("unplaced_block_weights") or []
        if unplaced:
            output.note(f"{len(unplaced)} weight(s) inside the blocks have no role and are not in the trunk "
                        f"(e.g. {unplaced[0]}); place them with --role-map")
        if summary["settings"].get("window_note"):
            output.note(f"note: {summary['settings']['window_note']} (--window sets it)")

    session.finish(report.to_hdf5_tree(), report.inputs, report.to_json(), render_backbone, figures=figures_and_notes)


def render_backbone(output: Any, s: dict) -> None:
    """Terminal view: one row per parameter set, then a(t) against ||r(t)||."""

    def row(name: str, r: dict) -> list[Any]:
        rho = r.get("rho") or [None]
        fb = r.get("f_b") or [None]
        return [
            name,
            None if rho[0] is None else 100.0 * rho[0],
            r.get("k95"),
            r.get("k99"),
            fb[-1],
            r.get("window_alignment_mean"),
            r.get("sign_flip_step"),
        ]

    rows = [row("trunk", s["trunk"])]
    for g, r in s.get("groups", {}).items():
        rows.append(row(f"group {g}", r))
    for b, r in s.get("blocks", {}).items():
        rows.append(row(f"block {b}", r))
    experts = s.get("experts", {})
    if 0 < len(experts) <= 16:
        rows += [row(f"expert {k}", r) for k, r in experts.items()]
    steps = s["steps"]
    output.table(
        f"backbone — {len(steps)} drift rows (steps {steps[0]}…{steps[-1]}), anchor step {s.get('anchor_step')}",
        ["parameters", "PC1 %", "k95", "k99", "final f_b", "mean c(w)", "t*"],
        rows,
        caption="PC1 % = sigma_1^2 / trace(G); f_b = backbone fraction a^2/||x||^2; c(w) = rolling-window PC1 alignment; t* = update-alignment sign flip",
    )
    if len(experts) > 16:
        pc1 = {k: 100.0 * r["rho"][0] for k, r in experts.items() if r.get("rho")}
        lo, hi = min(pc1, key=pc1.get), max(pc1, key=pc1.get)
        output.print(f"{len(experts)} experts (in the JSON and HDF5 report): PC1 % from {pc1[lo]:.1f} (expert {lo}) "
                     f"to {pc1[hi]:.1f} (expert {hi})")
    t = s["trunk"]
    output.print(f"a(t)     {sparkline(t['a'])}  {t['a'][0]:.3g} → {t['a'][-1]:.3g}")
    output.print(f"||r(t)|| {sparkline(t['r_norm'])}  {t['r_norm'][0]:.3g} → {t['r_norm'][-1]:.3g}")
    groups = s.get("groups", {})
    if groups:
        cons = ", ".join(f"{g}: step {r.get('consolidation_step')}" for g, r in groups.items())
        output.print(f"consolidation (velocity stays below 10% of peak): {cons}")
    render_dynamics(output, s, rows_of=[("trunk", t), *((f"group {g}", r) for g, r in groups.items()),
                                        *((f"block {b}", r) for b, r in s.get("blocks", {}).items())])
    for i, sw in enumerate(s.get("switch", [])):
        output.print(
            f"switch {i}: steps {sw.get('peak')}→{sw.get('trough')}  |cos(v_sw, v_b)| = {fmt(sw.get('abs_cos_backbone'))}, "
            f"E_2:6 = {fmt(sw.get('e_2_6'))}"
        )
        cap, perp = sw.get("capture_pc2_to_k") or [], sw.get("capture_perp_pc2_to_k") or []
        if cap:
            ks = sorted({0, min(4, len(cap) - 1), len(cap) - 1})
            output.print("  captured by PC2..PCk (v_sw / v_sw without its backbone part): "
                         + ", ".join(f"k={k + 2}: {fmt(cap[k])} / {fmt(perp[k])}" for k in ks))
        res = sw.get("residual_projection") or []
        if res:
            output.print(f"  <r(t), v_sw> {sparkline(res)}  {fmt(res[0])} → {fmt(res[-1])}")


def _fit(f: dict | None) -> str | None:
    if not f:
        return None
    se = f.get("slope_se")
    return f"{fmt(f['slope'])} ± {fmt(se)}" if se is not None else fmt(f["slope"])


def render_dynamics(output: Any, s: dict, rows_of: list[tuple[str, dict]]) -> None:
    """Terminal view of the trajectory dynamics: window stability against the global backbone beside the rotation
    between consecutive windows, the power-law exponents with their fit range, and a(t) on the raw and on the
    row-normalised backbone side by side."""
    rows = [[name, r.get("window_alignment_mean"), r.get("window_rotation_mean"), r.get("window_rotation_max_deg"),
             r.get("local_window_rotation_mean"), _fit(r.get("loglog_a")), _fit(r.get("loglog_r_norm")),
             r.get("rownorm_backbone_abs_cos")] for name, r in rows_of]
    fit = s["trunk"].get("loglog_a") or {}
    span = f"steps {fit.get('first_step')}…{fit.get('last_step')} ({fit.get('n')} rows)" if fit else "no usable rows"
    output.table(
        "trajectory dynamics",
        ["parameters", "mean c(w) vs v_b", "mean rotation w→w+1", "max rotation °", "mean local rotation",
         "a ~ τ^p", "||r|| ~ τ^p", "|cos(v_b, v_b rownorm)|"],
        rows,
        caption=f"c(w) = |<PC1 of window w, global backbone>|; rotation = |<PC1 of window w, PC1 of window w+1>| (same "
                f"windows); local = windows of {s['settings']['window']} checkpoints re-anchored at their first, unit rows "
                f"(paper 001's code); p = slope of log10|a|, log10||r|| on log10 τ, τ = steps since the anchor, "
                f"± its standard error, trunk fit over {span}",
    )
    t = s["trunk"]
    if t.get("a_rownorm"):
        output.print(f"a(t) raw backbone      {sparkline(t['a'])}  {fmt(t['a'][0])} → {fmt(t['a'][-1])}")
        a_n = t["a_rownorm"]
        output.print(f"a(t) row-norm backbone {sparkline(a_n)}  {fmt(a_n[0])} → {fmt(a_n[-1])}")
    output.print(f"da/dt     {sparkline(t['speed_a'])}  {fmt(t['speed_a'][0])} → {fmt(t['speed_a'][-1])}  (per step)")
    output.print(f"d||r||/dt {sparkline(t['speed_r_norm'])}  {fmt(t['speed_r_norm'][0])} → {fmt(t['speed_r_norm'][-1])}")
