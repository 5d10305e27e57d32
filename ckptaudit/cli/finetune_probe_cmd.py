"""`ckptaudit finetune-probe MODEL --contexts FILE` (SPEC §6): Born-gap trajectories under single-context fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession, Progress, load_model_input
from ckptaudit.cli.options import (
    DeviceOpt,
    JsonOpt,
    ModelArg,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    PlotOpt,
    QuietOpt,
    SeedOpt,
    StrictContextsOpt,
    parse_floats,
)
from ckptaudit.errors import UsageError
from ckptaudit.report.console import fmt
from ckptaudit.report.plots import plot_finetune, run_label


@app.command("finetune-probe")
def finetune_probe_cmd(
    model: ModelArg,
    contexts: Annotated[
        Path, typer.Option("--contexts", help='JSONL: {"context": ..., "target": " word", "competitor": " word"} per line; "near-synonyms" names the ten pairs shipped with ckptaudit.')
    ],
    mode: Annotated[
        str, typer.Option("--mode", help="lora (peft adapter, rank 8, alpha 16, on attention query/value) or full (all parameters).")
    ] = "lora",
    lr: Annotated[
        float | None, typer.Option("--lr", help="AdamW learning rate (default 2e-4 for lora, 2e-5 for full).")
    ] = None,
    steps: Annotated[int, typer.Option("--train-steps", min=1, help="Optimizer steps per context; Phi etc. are recorded after each.")] = 50,
    lr_sweep: Annotated[
        str | None,
        typer.Option("--lr-sweep", help="Comma-separated learning rates to run each context at; reports the empirical critical rate."),
    ] = None,
    nucleus: Annotated[
        float, typer.Option("--nucleus", min=0.0, max=1.0, help="Pool = smallest set of tokens reaching this probability mass.")
    ] = 0.9,
    strict: StrictContextsOpt = False,
    target_modules: Annotated[
        str | None,
        typer.Option("--target-modules", help="LoRA target module names, comma-separated (default: the architecture's query/value projections)."),
    ] = None,
    plot: PlotOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune on each context's single next-token cross-entropy (from the original weights each time) and record
    loss, p_y, p_c, logit gap, Phi, S, D, PR and xi after every step: flip step, jump concentration ratio, character
    (catapult / intermediate / drift), failure type (kinematic / structural), Phi-saturation vs CE stop step, and
    under LoRA the bit-for-bit proof that the embedding matrix (and LM head) did not change.

    Example: ckptaudit finetune-probe models/smollm-135m --contexts near-synonyms --mode full --lr 2e-5
    """
    from ckptaudit.analyses.born_gap import load_contexts
    from ckptaudit.analyses.finetune import DEFAULT_LR, finetune_probe

    mode = mode.strip().lower()
    if mode not in ("lora", "full"):
        raise UsageError(f"--mode {mode}: unknown mode", "use lora or full")
    if lr is not None and lr_sweep is not None:
        raise UsageError("give --lr or --lr-sweep, not both")
    if lr is not None and not lr > 0:
        raise UsageError(f"--lr {lr}: the learning rate must be positive")
    lrs = sorted(set(parse_floats(lr_sweep, "--lr-sweep", "1e-4,2e-4,5e-4", positive=True))) if lr_sweep is not None else [lr if lr is not None else DEFAULT_LR[mode]]
    modules = [m for m in target_modules.split(",") if m.strip()] if target_modules else None
    if modules and mode != "lora":
        raise UsageError("--target-modules applies to --mode lora only")

    session = LocalSession("finetune-probe", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output, dev = session.output, session.device
    ctxs = load_contexts(contexts)
    ckpt, tok, net = load_model_input(model, dev)
    with Progress(output, f"finetune-probe ({mode})", len(ctxs) * len(lrs) * steps, "steps") as hook:
        result = finetune_probe(net, tok, ctxs, mode=mode, lrs=lrs, steps=steps, nucleus=nucleus, strict=strict,
                                target_modules=modules, seed=seed, device=dev, progress=hook)

    def figures(s: dict) -> None:
        for p in plot_finetune(s, plot, label=run_label(ckpt.path, checkpoint=True)):
            output.note(f"figure written to {p}")

    session.finish(result.to_hdf5_tree(), [ckpt], result.to_json(), lambda out, s: render_finetune(out, s, str(ckpt.path)),
                   figures=None if plot is None else figures)


def render_finetune(output: Any, s: dict, label: str) -> None:
    """Terminal view of finetune-probe's JSON document: one row per context and learning rate, the optimizer and
    LoRA set-up, and the empirical critical learning rate of a sweep."""
    rows = [
        [c["target"], c["competitor"], c["lr"], f"{fmt(c['phi'][0])} → {fmt(c['phi'][-1])}",
         f"{fmt(c['loss'][0])} → {fmt(c['loss'][-1])}", c["flip_step"], c["jump_ratio"], c["character"],
         c["failure_type"], f"{fmt(c['phi_stop_step'])} / {fmt(c['ce_stop_step'])}", c["embeddings_unchanged"]]
        for c in s["contexts"]
    ]
    output.table(
        f"finetune-probe — {label} ({s['mode']}, {s['steps']} steps; unembedding: {s['unembedding']})",
        ["target", "competitor", "lr", "Phi start → end", "loss start → end", "flip", "jump ratio", "character",
         "failure", "stop Phi / CE", "E same"],
        rows,
        caption="flip = first step with Phi > 0; catapult: jump ratio >= 8, drift: <= 5; failure only when Phi never "
                "turns positive (kinematic: drag improved, structural: drag worsened); stop = first step after which the "
                "series moves < 1% of its range for 3 steps (Phi's searched from the flip on)",
    )
    output.print(f"optimizer: {s['optimizer']}")
    if s.get("target_modules"):
        note = f" ({s['target_note']})" if s.get("target_note") else ""
        output.print(f"LoRA rank 8, alpha 16, dropout 0 on {', '.join(s['target_modules'])}{note}")
        same = all(c["embeddings_unchanged"] for c in s["contexts"])
        output.print("embeddings (and LM head) bit-identical after every LoRA run: max |ΔE| == 0" if same
                     else "[bold red]embedding matrix changed under LoRA[/bold red]")
    from ckptaudit.cli.born_gap_cmd import skipped_contexts_note

    skipped_contexts_note(output, s)
    if s.get("critical_lr"):
        crit = s["critical_lr"]
        output.table(
            "empirical critical learning rate (smallest swept rate that flips Phi within the step budget)",
            ["context", "target", "critical lr"],
            [[c["context"], c["target"], "pre-resolved" if c["pre_resolved"] else c["critical_lr"]] for c in crit["per_context"]],
            caption=f"swept {', '.join(f'{x:g}' for x in crit['lrs'])}; median over contexts that flip: "
                    + ("—" if crit["median"] is None else f"{crit['median']:g}"),
        )


