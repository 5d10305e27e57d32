"""`ckptaudit finetune-probe MODEL --contexts FILE` (SPEC §6): Born-gap trajectories under single-context fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import Progress, make_output, save_report
from ckptaudit.cli.options import (
    DeviceOpt,
    JsonOpt,
    NoReportOpt,
    OutOpt,
    PlotOpt,
    QuietOpt,
    SeedOpt,
    parse_floats,
    resolve_device,
)
from ckptaudit.errors import UsageError
from ckptaudit.report.console import fmt

# Spelled here rather than imported from embeddings_cmd: importing that module first would re-enter app.py's
# command registration half-way (a circular import).
ModelArg = Annotated[
    str,
    typer.Argument(help="A local model directory, a weight file (safetensors, GGUF...), or a hub id already in the local cache."),
]


@app.command("finetune-probe")
def finetune_probe_cmd(
    model: ModelArg,
    contexts: Annotated[
        Path, typer.Option("--contexts", help='JSONL: {"context": ..., "target": " word", "competitor": " word"} per line.')
    ],
    mode: Annotated[
        str, typer.Option("--mode", help="lora (peft adapter, rank 8, alpha 16, on attention query/value) or full (all parameters).")
    ] = "lora",
    lr: Annotated[
        float | None, typer.Option("--lr", help="AdamW learning rate (default 2e-4 for lora, 2e-5 for full).")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps per context; Phi etc. are recorded after each.")] = 50,
    lr_sweep: Annotated[
        str | None,
        typer.Option("--lr-sweep", help="Comma-separated learning rates to run each context at; reports the empirical critical rate."),
    ] = None,
    nucleus: Annotated[
        float, typer.Option("--nucleus", min=0.0, max=1.0, help="Pool = smallest set of tokens reaching this probability mass.")
    ] = 0.9,
    target_modules: Annotated[
        str | None,
        typer.Option("--target-modules", help="LoRA target module names, comma-separated (default: the architecture's query/value projections)."),
    ] = None,
    plot: PlotOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune on each context's single next-token cross-entropy (from the original weights each time) and record
    loss, p_y, p_c, logit gap, Phi, S, D, PR and xi after every step: flip step, jump concentration ratio, character
    (catapult / intermediate / drift), failure type (kinematic / structural), Phi-saturation vs CE stop step, and
    under LoRA the bit-for-bit proof that the embedding matrix (and LM head) did not change.

    Example: ckptaudit finetune-probe models/smollm-135m --contexts fixtures/contexts/near_synonyms.jsonl --mode full --lr 2e-5
    """
    from ckptaudit.analyses.finetune import DEFAULT_LR, OPTIMIZER, finetune_probe
    from ckptaudit.analyses.synonyms import load_contexts
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model, load_tokenizer, resolve_model_path

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

    output = make_output(json_out, quiet)
    dev = resolve_device(device)
    path = Path(resolve_model_path(model))
    ctxs = load_contexts(contexts)
    ckpt = discover_run(path).checkpoints[-1]
    tok = load_tokenizer(ckpt.path if ckpt.layout == "gguf" else path)  # a GGUF carries its tokenizer inside
    net = load_model(ckpt, device=dev)
    with Progress(output, f"finetune-probe ({mode})", len(ctxs) * len(lrs) * steps) as hook:
        result = finetune_probe(net, tok, ctxs, mode=mode, lrs=lrs, steps=steps, nucleus=nucleus,
                                target_modules=modules, seed=seed, device=dev, progress=hook)
    save_report(output, "finetune-probe", result.to_hdf5_tree(), [ckpt], out, no_report, device=dev)
    summary = result.to_json()
    if plot is not None:
        for p in plot_trajectories(summary, plot):
            output.note(f"figure written to {p}")
    output.json(summary)
    if not output.human:
        return
    rows = [
        [c["target"], c["competitor"], c["lr"], f"{fmt(c['phi'][0])} → {fmt(c['phi'][-1])}",
         f"{fmt(c['loss'][0])} → {fmt(c['loss'][-1])}", c["flip_step"], c["jump_ratio"], c["character"],
         c["failure_type"], f"{fmt(c['phi_stop_step'])} / {fmt(c['ce_stop_step'])}", c["embeddings_unchanged"]]
        for c in summary["contexts"]
    ]
    output.table(
        f"finetune-probe — {path} ({mode}, {steps} steps; unembedding: {result.unembedding})",
        ["target", "competitor", "lr", "Phi start → end", "loss start → end", "flip", "jump ratio", "character",
         "failure", "stop Phi / CE", "E same"],
        rows,
        caption="flip = first step with Phi > 0; catapult: jump ratio >= 8, drift: <= 5; failure only when Phi never "
                "turns positive (kinematic: drag improved, structural: drag worsened); stop = first step after which the "
                "series moves < 1% of its range for 3 steps (Phi's searched from the flip on)",
    )
    output.print(f"optimizer: {OPTIMIZER}")
    if result.target_modules:
        note = f" ({result.target_note})" if result.target_note else ""
        output.print(f"LoRA rank 8, alpha 16, dropout 0 on {', '.join(result.target_modules)}{note}")
        same = all(c["embeddings_unchanged"] for c in summary["contexts"])
        output.print("embeddings (and LM head) bit-identical after every LoRA run: max |ΔE| == 0" if same
                     else "[bold red]embedding matrix changed under LoRA[/bold red]")
    if result.swept:
        crit = summary["critical_lr"]
        output.table(
            "empirical critical learning rate (smallest swept rate that flips Phi within the step budget)",
            ["context", "target", "critical lr"],
            [[c["context"], c["target"], "pre-resolved" if c["pre_resolved"] else c["critical_lr"]] for c in crit["per_context"]],
            caption=f"swept {', '.join(f'{x:g}' for x in crit['lrs'])}; median over contexts that flip: "
                    + ("—" if crit["median"] is None else f"{crit['median']:g}"),
        )


def plot_trajectories(summary: dict, out_dir: Path) -> list[Path]:
    """One PNG per run: Phi, S, D (left axis) and the CE loss (right axis) against the step. Returns the files."""
    from ckptaudit.report.plots import _pyplot

    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, c in enumerate(summary["contexts"]):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        t = range(len(c["phi"]))
        ax.plot(t, c["phi"], label="Phi", lw=2)
        ax.plot(t, c["signal"], label="signal S", ls="--")
        ax.plot(t, c["drag"], label="drag D", ls=":")
        ax.axhline(0.0, color="grey", lw=0.6)
        if c["flip_step"] is not None:
            ax.axvline(c["flip_step"], color="tab:red", lw=0.8, label=f"flip (step {c['flip_step']})")
        ax2 = ax.twinx()
        ax2.plot(t, c["loss"], color="black", alpha=0.4, label="CE loss")
        ax2.set_ylabel("CE loss")
        ax.set_xlabel("step")
        ax.set_title(f"{c['target'].strip()} vs {c['competitor'].strip()} — {c['mode']}, lr {c['lr']:g}")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() else "_" for ch in c["target"].strip()) or "target"
        p = out_dir / f"finetune_{i:03d}_{safe}_lr{c['lr']:g}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
