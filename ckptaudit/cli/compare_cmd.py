"""`ckptaudit compare REPORT.h5 REPORT.h5 ...`: the same quantities from several reports of one command, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession
from ckptaudit.cli.options import JsonOpt, PlotOpt, QuietOpt
from ckptaudit.report.console import fmt, sparkline


@app.command("compare")
def compare_cmd(
    reports: Annotated[list[Path], typer.Argument(help="Two or more HDF5 reports written by the same ckptaudit command.")],
    quantity: Annotated[
        list[str] | None,
        typer.Option("--quantity", metavar="PATH",
                     help="A quantity to compare, by its path in the report (e.g. backbone/trunk/k95, backbone/trunk/rho[0], "
                          "regimes/similarity); repeatable. Default: the command's headline quantities."),
    ] = None,
    all_quantities: Annotated[
        bool, typer.Option("--all", help="Also every numeric attribute that all the reports hold.")
    ] = False,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Comma-separated names for the reports, in order (default: the file names).")
    ] = None,
    plot: PlotOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Line up the same quantities from several reports of one command (runs, seeds, checkpoints) in one table —
    each value with its standard error where the report has one, and the mean and std over the reports — and with
    --plot in one figure.

    Example: ckptaudit compare seed0/backbone.h5 seed1/backbone.h5 seed2/backbone.h5 --plot figs/
    """
    from ckptaudit.report.compare import (
        compare,
        default_specs,
        load_reports,
        plot_comparison,
        specs_from_paths,
    )

    output = LocalSession("compare", None, json_out, quiet).output
    names = [x.strip() for x in labels.split(",")] if labels is not None else None
    loaded = load_reports(reports, names)
    if quantity:
        scalars, series = specs_from_paths(loaded, quantity)
        omitted = 0
    else:
        scalars, series, omitted = default_specs(loaded, all_quantities)
    result = compare(loaded, scalars, series, omitted)
    summary = result.to_json()
    if plot is not None:
        written = plot_comparison(result, plot)
        output.note(f"figure written to [bold]{written}[/bold]")
    output.json(summary)
    if output.human:
        render_comparison(output, summary)


def _cell(v: Any, se: float | None) -> str:
    return fmt(v) if se is None else f"{fmt(v)} ± {fmt(se)}"


def render_comparison(output: Any, s: dict) -> None:
    """One row per quantity, one column per report, then mean and std; series as sparklines."""
    from rich.markup import escape

    labels = [r["label"] for r in s["reports"]]
    rows = [["checkpoints", *(f"{len(r['input_steps'])} (steps {r['input_steps'][0]}…{r['input_steps'][-1]})"
                              if r["input_steps"] else "—" for r in s["reports"]), None, None]]
    for q in s["quantities"]:
        ses = q["se"] or [None] * len(labels)
        rows.append([escape(q["name"]), *(_cell(v, e) for v, e in zip(q["values"], ses, strict=True)), q["mean"], q["std"]])
    output.table(f"compare — {s['command']}, {len(labels)} reports", ["quantity", *map(escape, labels), "mean", "std"], rows,
                 caption="value ± standard error where the report has one; mean and std (ddof 1) over the reports that hold a number")
    if s.get("omitted"):
        output.print(f"{s['omitted']} more quantities that every report holds: --all shows them, --quantity PATH picks some")
    for ser in s["series"]:
        output.print(f"[bold]{escape(ser['name'])}[/bold]")
        for line in ser["lines"]:
            y = line["y"]
            output.print(f"  {escape(line['label']):<24} {sparkline(y)}  {fmt(y[0]) if y else '—'} → {fmt(y[-1]) if y else '—'}")
