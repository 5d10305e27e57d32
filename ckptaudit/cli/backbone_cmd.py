"""`ckptaudit backbone RUN`: uncentered drift-matrix SVD of a training trajectory (SPEC §1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import Progress, Session, load_drift_run
from ckptaudit.cli.options import (
    DeviceOpt,
    JsonOpt,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    PlotOpt,
    QuietOpt,
    RoleMapOpt,
    RunDirArg,
    StepsOpt,
    check_output_file,
    parse_switch,
)
from ckptaudit.errors import UsageError
from ckptaudit.report.console import sparkline


def parse_blocks(spec: str | None) -> list[int] | None:
    """'0,2,5' or '0-3' -> block indices."""
    if spec is None:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                if int(lo) > int(hi):
                    raise UsageError(f"--blocks {spec}: range {part} runs backwards", f"write {hi}-{lo}")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise UsageError(f"--blocks {spec}: expected block indices like 0,2,5 or 0-3", None) from None
    if not out:
        raise UsageError(f"--blocks {spec!r}: selects no block", "e.g. --blocks 0,2,5 or --blocks 0-3")
    return out


@app.command()
def backbone(
    run_dir: RunDirArg,
    steps: StepsOpt = None,
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
    plot: PlotOpt = None,
    role_map: RoleMapOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Streaming SVD of the drift matrix X (rows theta(t) - theta(anchor)) for the trunk, each block and the role
    groups G (q,k) and S (v,o,mlp): spectrum, backbone coordinate, residual, rolling stability, update alignment,
    switching directions, velocities. Reads every tensor byte once; memory does not grow with model size.

    Example: ckptaudit backbone runs/seed42/ --save-vectors backbone.safetensors
    """
    from ckptaudit.analyses.backbone import run_backbone
    from ckptaudit.io.roles import load_role_map

    with Session("backbone", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash) as session:
        output, dev, main = session.output, session.device, session.main
        run = load_drift_run(run_dir, steps, anchor)
        if len(run.checkpoints) < 3:
            raise UsageError(
                f"{run_dir}: backbone needs at least 3 checkpoints (an anchor and 2 drift rows), found {len(run.checkpoints)}",
                "point it at a run directory with more checkpoints, or widen --steps",
            )
        switches = [parse_switch(s) for s in (switch or [])]
        rmap = load_role_map(role_map) if role_map is not None else None
        with Progress(output, "backbone: reading checkpoints", None) as hook:
            report = run_backbone(
                run,
                anchor_step=anchor,
                blocks=parse_blocks(blocks),
                include_bias=include_bias,
                window=window,
                normalize_rows=normalize_rows,
                switches=switches,
                metric=metric,
                device=dev,
                role_map=rmap,
                save_vectors=save_vectors,
                top_k_vectors=top_k,
                progress=hook if main else None,
                progress_total=hook.set_total if main else None,
            )
    if not main:
        return
    session.save_report(report.to_hdf5_tree(), run.checkpoints)
    summary = report.to_json()
    output.json(summary)
    if plot is not None:
        from ckptaudit.report.plots import plot_backbone

        written = plot_backbone(summary, plot)
        output.note(f"figures written to [bold]{plot}[/bold] ({len(written)} files)")
    if save_vectors is not None:
        output.note(f"backbone vectors written to [bold]{save_vectors}[/bold]")
    unplaced = summary["settings"].get("unplaced_block_weights") or []
    if unplaced:
        output.note(f"{len(unplaced)} weight(s) inside the blocks have no role and are not in the trunk "
                    f"(e.g. {unplaced[0]}); place them with --role-map")
    if summary["settings"].get("window_note"):
        output.note(f"note: {summary['settings']['window_note']} (--window sets it)")
    if output.human:
        render_backbone(output, summary)




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
    steps = s["steps"]
    output.table(
        f"backbone — {len(steps)} drift rows (steps {steps[0]}…{steps[-1]}), anchor step {s.get('anchor_step')}",
        ["parameters", "PC1 %", "k95", "k99", "final f_b", "mean c(w)", "t*"],
        rows,
        caption="PC1 % = sigma_1^2 / trace(G); f_b = backbone fraction a^2/||x||^2; c(w) = rolling-window PC1 alignment; t* = update-alignment sign flip",
    )
    t = s["trunk"]
    output.print(f"a(t)     {sparkline(t['a'])}  {t['a'][0]:.3g} → {t['a'][-1]:.3g}")
    output.print(f"||r(t)|| {sparkline(t['r_norm'])}  {t['r_norm'][0]:.3g} → {t['r_norm'][-1]:.3g}")
    groups = s.get("groups", {})
    if groups:
        cons = ", ".join(f"{g}: step {r.get('consolidation_step')}" for g, r in groups.items())
        output.print(f"consolidation (velocity stays below 10% of peak): {cons}")
    for i, sw in enumerate(s.get("switch", [])):
        output.print(
            f"switch {i}: steps {sw.get('peak')}→{sw.get('trough')}  |cos(v_sw, v_b)| = {sw.get('abs_cos_backbone'):.4g}, "
            f"E_2:6 = {sw.get('e_2_6'):.4g}"
        )
