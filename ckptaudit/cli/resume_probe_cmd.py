"""`ckptaudit resume-probe CKPT`: resume from one checkpoint with preserved vs reset optimizer state (SPEC §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession, Progress, render_facts
from ckptaudit.cli.options import (
    CheckpointArg,
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
    SeqLenOpt,
    TaskOpt,
    ThreadsOpt,
    TrainTokensOpt,
)
from ckptaudit.report.plots import plot_resume


@app.command("resume-probe")
def resume_probe(
    ckpt: CheckpointArg,
    steps: Annotated[
        int, typer.Option("--train-steps", min=1, help="Optimizer steps to resume for, per condition (--steps selects checkpoints elsewhere).")
    ] = 50,
    eval_every: Annotated[
        int | None,
        typer.Option(
            "--eval-every",
            min=1,
            help="Evaluate every K steps (default: at 0, 1, 2, 5, 10, 20, 50, 100, ... and the last step).",
        ),
    ] = None,
    lr_mult: Annotated[
        str,
        typer.Option(
            "--lr-mult", help="RESET learning-rate multipliers of the checkpoint's lr, comma-separated."
        ),
    ] = "1,0.1,0.01",
    warmup_steps: Annotated[
        int,
        typer.Option(
            "--warmup-steps",
            min=0,
            help="Steps of the linear warm-up of the RESET+warm-up condition (0: skip it).",
        ),
    ] = 10,
    no_boundary: Annotated[
        bool,
        typer.Option(
            "--no-boundary-probe",
            help="Skip the warm-up boundary probe (lr ramped geometrically 1e-3x -> 1x).",
        ),
    ] = False,
    reset_optimizer: Annotated[
        bool, typer.Option("--reset-optimizer", help="Run only the RESET family (fresh optimizer state).")
    ] = False,
    preserve_optimizer: Annotated[
        bool,
        typer.Option("--preserve-optimizer", help="Run only CONTROL (saved optimizer and scheduler state)."),
    ] = False,
    collapse_drop: Annotated[
        float,
        typer.Option(
            "--collapse-drop",
            min=0.0,
            help="Collapse when accuracy falls more than this (absolute) below the start.",
        ),
    ] = 0.2,
    collapse_ratio: Annotated[
        float,
        typer.Option(
            "--collapse-ratio",
            min=1.0,
            help="Collapse when eval loss rises above this multiple of the start loss (and --collapse-loss-floor above it).",
        ),
    ] = 2.0,
    collapse_loss_floor: Annotated[
        float,
        typer.Option(
            "--collapse-loss-floor",
            min=0.0,
            help="The loss rule also needs the loss this many nats above the start (a converged model's 1e-4 -> 3e-4 "
                 "is no collapse).",
        ),
    ] = 0.1,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Data-order seed of the resumed batches (default: the checkpoint's own, so CONTROL repeats the run); also seeds torch.",
        ),
    ] = None,
    task: TaskOpt = None,
    data: DataOpt = None,
    train_data: Annotated[
        Path | None,
        typer.Option(
            "--train-data",
            help="The run's training set as its trainer indexed it (token-id rows used as they are, one example per "
            "row; text cut into --seq-len windows). With a Trainer checkpoint, CONTROL is then "
            "Trainer.train(resume_from_checkpoint=CKPT) itself.",
        ),
    ] = None,
    seq_len: SeqLenOpt = None,
    pack: PackOpt = False,
    eval_tokens: EvalTokensOpt = 65536,
    train_tokens: TrainTokensOpt = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, help="Sequences per training step (default: the run's, from "
                     "trainer_state.json / training_args.bin / ckptaudit_task.json)."),
    ] = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            min=0.0,
            help="Base learning rate that the RESET multipliers scale (default: the lr in effect at the checkpoint).",
        ),
    ] = None,
    vectors: Annotated[
        Path | None,
        typer.Option(
            "--vectors",
            help="Backbone vectors (safetensors from `backbone --save-vectors`): also report backbone coordinate and transverse residual.",
        ),
    ] = None,
    plot: PlotOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Resume training from one checkpoint under CONTROL (the run continued: saved optimizer state, schedule, batch
    size and RNG state; a Trainer checkpoint with --train-data resumes through the Trainer itself) and RESET
    conditions (fresh optimizer; lr multipliers, linear warm-up, geometric warm-up boundary probe), all from
    bit-identical weights on identical batches; report eval loss/accuracy, displacement, and collapse verdicts.
    A PEFT LoRA checkpoint resumes its adapter: the base model wrapped by PEFT, only the adapter parameters train.

    Example: ckptaudit resume-probe runs/grok4/checkpoint-20000 --train-steps 50
    """
    from ckptaudit import api

    session = LocalSession("resume-probe", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output = session.output
    with Progress(output, "resume-probe", steps, "steps") as hook:
        result = api.resume_probe(
            ckpt, train_steps=steps, eval_every=eval_every, lr_mults=lr_mult, warmup_steps=warmup_steps,
            boundary_probe=not no_boundary, reset_optimizer=reset_optimizer, preserve_optimizer=preserve_optimizer,
            collapse_drop=collapse_drop, collapse_ratio=collapse_ratio, collapse_loss_floor=collapse_loss_floor,
            seed=seed, task=task, data=data, train_data=train_data, seq_len=seq_len, pack=pack, eval_tokens=eval_tokens,
            train_tokens=train_tokens, batch_size=batch_size, dtype=dtype, threads=threads, lr=lr, vectors=vectors,
            device=session.device, progress=hook,
        )  # fmt: skip

    def figures(s: dict) -> None:
        output.note(f"figure written to [bold]{plot_resume(s, plot)}[/bold]")

    session.finish(result.to_hdf5_tree(), result.inputs, result.to_json(), render_resume,
                   figures=None if plot is None else figures)




def render_resume(output: Any, s: dict) -> None:
    """Terminal view: one row per condition, then the summary lines."""
    rows = []
    for c in s["conditions"]:
        verdict = "[green]stable[/green]" if c["verdict"] == "stable" else "[red]collapse[/red]"
        rows.append([c["name"], c["optimizer"], c["lr_mult"], c["eval_acc"][0], c["eval_acc"][-1], min(c["eval_acc"]),
                     c["eval_loss"][0], max(c["eval_loss"]), verdict, c.get("collapse_reason") or "—"])  # fmt: skip
    output.table(
        f"resume-probe — {s['checkpoint']} (step {s['start_step']}, task {s['task']})",
        [
            "condition",
            "optimizer",
            "lr mult",
            "start acc",
            "final acc",
            "min acc",
            "start loss",
            "max loss",
            "verdict",
            "rule that fired",
        ],
        rows,
        caption=(f"collapse: accuracy more than {s['settings'].get('collapse_drop')} below the start, or loss above "
                 f"{s['settings'].get('collapse_ratio')}x the start and {s['settings'].get('collapse_loss_floor')} "
                 "nats above it, or a non-finite value"),
    )
    with_vec = [c for c in s["conditions"] if "backbone_coord" in c]
    if with_vec:
        output.table(
            "displacement from the checkpoint at the last step",
            ["condition", "||theta - theta_0||", "backbone coord <d, v_b>", "transverse residual ||r||"],
            [
                [c["name"], c["displacement"][-1], c["backbone_coord"][-1], c["transverse_residual"][-1]]
                for c in with_vec
            ],
        )
    yes = {True: "[red]yes[/red]", False: "[green]no[/green]", None: "— (needs CONTROL and RESET x1)"}
    output.print(f"Level-2 sensitive (CONTROL stable, RESET collapses): {yes[s['level2_sensitive']]}")
    output.print(
        f"largest safe RESET lr multiplier: {s['max_safe_reset_lr_mult'] if s['max_safe_reset_lr_mult'] is not None else 'none'}"
    )
    if any(c["name"] == "warmup_boundary" for c in s["conditions"]):
        b = s["warmup_boundary_lr_mult"]
        text = f"instability begins at {b:.3g} x lr" if b is not None else "stable up to 1x lr"
        output.print(f"warm-up boundary: {text}")
    output.print(f"start weights SHA-256 (equal for every condition): {s['start_weights_sha256']}")
    st = s["settings"]
    if st.get("run_values"):
        output.table(f"CONTROL: {st.get('control')} — the run's values and where they came from", ["value", "", "source"],
                     [[k, v["value"], v["source"]] for k, v in st["run_values"].items()])
    render_facts(output, st)
    if not s["provenance_complete"]:
        output.print(
            "[red]provenance incomplete[/red]: no optimizer state in the checkpoint, only RESET could be probed"
        )
    for note in s["notes"]:
        output.print(f"note: {note}")
