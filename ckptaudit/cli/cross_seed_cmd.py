"""`ckptaudit cross-seed RUN RUN ...` (SPEC §7, paper 004 section 2.4)."""

from __future__ import annotations

from pathlib import Path
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
    ProbesOpt,
    QuietOpt,
    SeedOpt,
    SeqLenOpt,
    StepsOpt,
    TaskOpt,
    ThreadsOpt,
    ThresholdsOpt,
)
from ckptaudit.cli.regimes_cmd import threshold_line
from ckptaudit.errors import UsageError


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
    from ckptaudit.analyses.regimes.run import REGIMES

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
    output.print(threshold_line(s["thresholds"]) + " (pooled over seeds)" * (s["thresholds"]["rule"] == "adaptive"))
    render_facts(output, s)
    for note in s["notes"]:
        output.print(f"note: {note}")
