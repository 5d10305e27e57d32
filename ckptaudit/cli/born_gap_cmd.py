"""`ckptaudit born-gap MODEL` (SPEC §6; paper 002 sections 2, 4, 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession, Progress
from ckptaudit.cli.options import (
    DeviceOpt,
    JsonOpt,
    ModelArg,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    QuietOpt,
    StrictContextsOpt,
)


@app.command("born-gap")
def born_gap_cmd(
    model: ModelArg,
    contexts: Annotated[
        Path, typer.Option("--contexts", help='JSONL: {"context": ..., "target": " word", "competitor": " word"} per line; "near-synonyms" names the ten pairs shipped with ckptaudit.')
    ],
    nucleus: Annotated[
        float, typer.Option("--nucleus", min=0.0, max=1.0, help="Pool = smallest set of tokens reaching this probability mass.")
    ] = 0.9,
    strict: StrictContextsOpt = False,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Near-synonym density-matrix observables at the last position of each context: Born gap Phi = signal + drag,
    throttle, logit gap, purity, participation ratio, localisation length, burial depth, geometric efficiency,
    Born and softmax ranks, and the competitor ablation.

    Example: ckptaudit born-gap models/smollm-135m --contexts near-synonyms
    """
    from ckptaudit import api

    session = LocalSession("born-gap", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output = session.output
    with Progress(output, "born-gap", None, "contexts") as hook:
        result = api.born_gap(model, contexts, nucleus=nucleus, strict=strict, device=session.device, progress=hook)
    ckpt = result.inputs[0]
    session.finish(result.to_hdf5_tree(), [ckpt], result.to_json(),
                   lambda out, s: render_born_gap(out, s, str(ckpt.path)))


def render_born_gap(output: Any, s: dict, label: str) -> None:
    """Terminal view of born-gap's JSON document: one row per context."""
    rows = [
        [c["target"], c["competitor"], c["pool_size"], c["phi"], c["signal"], c["drag"], c["throttle"], c["logit_gap"],
         c["pr"], c["burial_depth"], c["born_rank"], c["softmax_rank"]]
        for c in s["contexts"]
    ]
    output.table(
        f"Born gap — {label} (unembedding: {s.get('unembedding')})",
        ["target", "competitor", "pool", "Phi", "S", "D", "throttle", "logit gap", "PR", "burial", "Born rank", "softmax rank"],
        rows,
        caption="Phi = P_B(target) - P_B(competitor) = S + D; Phi < 0: the competitor wins in Born geometry",
    )
    skipped_contexts_note(output, s)


def skipped_contexts_note(output: Any, s: dict) -> None:
    """One line per context the command skipped (born-gap, finetune-probe), naming its file line and why."""
    from rich.markup import escape

    for k in s.get("skipped_contexts") or []:
        output.print(f"[yellow]skipped[/yellow] {escape(str(k['where']))}: {escape(str(k['reason']))} "
                     "(--strict stops instead)")
