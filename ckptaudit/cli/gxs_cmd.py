"""`ckptaudit gxs transplant|velocity|slack`: Geometry x Slack (SPEC §4)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import AuditGroup, app
from ckptaudit.cli.common import LocalSession, Progress, load_drift_run, load_run, render_facts
from ckptaudit.cli.options import (
    AllowPartialTrunkOpt,
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
    RoleMapOpt,
    RunDirArg,
    SeedOpt,
    SeqLenOpt,
    StepsOpt,
    TaskOpt,
    ThreadsOpt,
    apply_threads,
    parse_floats,
    window_spec,
)
from ckptaudit.errors import UsageError
from ckptaudit.report.console import fmt

gxs_app = typer.Typer(
    cls=AuditGroup,
    help="Geometry x Slack: QK transplants between two models, G-before-S consolidation, the slack (margin) probe.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(gxs_app, name="gxs")

SplitOpt = Annotated[str, typer.Option("--split", help="Split to evaluate on: validation or train (of the task, or of --data's windows).")]
MaxSeqOpt = Annotated[int | None, typer.Option("--max-sequences", min=1, help="With --as-given: use at most this many --data sequences.")]
AsGivenOpt = Annotated[bool, typer.Option(
    "--as-given", help="Evaluate --data sequence by sequence as given (one per line of text, per JSONL entry, per "
    ".npy row; nothing cut or joined) instead of cutting it into --seq-len windows.")]


def _last_checkpoint(path: Path) -> Any:
    """The checkpoint of a checkpoint directory/file, or the last checkpoint of a run directory."""
    return load_run(path).checkpoints[-1]


def _evaluator(task: str | None, data: Path | None, split: str, ckpt: Any, max_sequences: int | None,
               as_given: bool = False, windows: Any = None) -> Any:
    from ckptaudit.analyses.gxs.evaluation import WindowEval
    from ckptaudit.analyses.gxs.run import TaskEval, load_token_data
    from ckptaudit.tasks.data import load_data

    if task is not None and data is not None:
        raise UsageError("--task and --data exclude each other", "give one of them")
    if split not in ("train", "validation"):
        raise UsageError(f"--split {split}: unknown split", "use validation or train")
    if as_given and data is None:
        raise UsageError("--as-given applies to --data", "give --data FILE, or drop --as-given")
    if max_sequences is not None and not as_given:
        raise UsageError("--max-sequences applies to --as-given", "use --eval-tokens to bound window data")
    if data is not None:
        if as_given:
            return load_token_data(data, ckpt, max_sequences)
        return WindowEval(load_data(ckpt, data=data, windows=windows), split)
    t = load_data(ckpt, task=task)  # --task NAME[:k=v], else the checkpoint's ckptaudit_task.json
    return TaskEval(t, split)


def _data_record(evaluator: Any, precision: Any) -> dict:
    """What the report says about the evaluation set and the precision."""
    record = {"precision": precision.to_json()}
    data = getattr(evaluator, "data", None)
    if data is not None and hasattr(data, "selection"):
        record["eval_data"] = data.selection()
    return record


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


# ------------------------------------------------------------------------------------------- transplant


@gxs_app.command("transplant")
def transplant_cmd(
    a: Annotated[Path, typer.Argument(help="Model A (receives B's Q/K): a checkpoint directory or file, or a run (its last checkpoint).")],
    b: Annotated[Path, typer.Argument(help="Model B (the donor), same architecture and shapes as A.")],
    heads: Annotated[
        str | None,
        typer.Option("--heads", help="Query heads to transplant, LAYER.HEAD comma-separated, LAYER.* for a whole layer (default sweep: 1 head, 2 heads, all heads)."),
    ] = None,
    no_control: Annotated[bool, typer.Option("--no-control", help="Skip the reverse control (S = v, o, MLP of B into A).")] = False,
    task: TaskOpt = None,
    data: DataOpt = None,
    split: SplitOpt = "validation",
    seq_len: SeqLenOpt = None,
    pack: PackOpt = False,
    eval_tokens: EvalTokensOpt = 65536,
    as_given: AsGivenOpt = False,
    max_sequences: MaxSeqOpt = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    role_map: RoleMapOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Copy the Q and K weights and biases of chosen heads from B into A (V, O, MLP, embeddings of A untouched),
    evaluate each hybrid (loss, accuracy, margin), prove bit by bit that swapped slices equal B and everything else
    equals A, and run the reverse control (S of B into A). Under grouped-query attention, lists every query head
    whose shared K a transplant touches.

    Example: ckptaudit gxs transplant runs/seed0 runs/seed1 --heads 0.0,0.1
    """
    from ckptaudit.analyses.gxs.run import (
        check_compatible,
        default_conditions,
        evaluate,
        parse_heads,
        run_transplant,
    )
    from ckptaudit.io.models import load_model
    from ckptaudit.io.precision import resolve_dtype
    from ckptaudit.io.roles import load_role_map, resolve_architecture

    session = LocalSession("gxs transplant", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output, dev = session.output, session.device
    n_threads = apply_threads(threads)
    t0 = time.perf_counter()
    ckpt_a, ckpt_b = _last_checkpoint(a), _last_checkpoint(b)
    torch_dtype, precision = resolve_dtype(dtype, ckpt_a, dev)
    rmap = load_role_map(role_map) if role_map is not None else None
    with ckpt_a.tensors() as src_a, ckpt_b.tensors() as src_b:
        shapes_a = {n: tuple(src_a.shape(n)) for n in src_a.keys()}
        shapes_b = {n: tuple(src_b.shape(n)) for n in src_b.keys()}
        arch_a = resolve_architecture(shapes_a, ckpt_a.config(), role_map=rmap)
        arch_b = resolve_architecture(shapes_b, ckpt_b.config(), role_map=rmap)
        check_compatible(shapes_a, shapes_b, arch_a, arch_b, f"A ({a})", f"B ({b})")
        chosen = parse_heads(heads, arch_a) if heads is not None else None
        conditions = default_conditions(arch_a, chosen, control=not no_control)
        evaluator = _evaluator(task, data, split, ckpt_a, max_sequences, as_given, window_spec(seq_len, pack, eval_tokens))
        # B on its own first, then A: one model in memory at a time.
        model_b = load_model(ckpt_b, device=dev, dtype=torch_dtype)
        donor = evaluate(model_b, evaluator)
        del model_b
        model_a = load_model(ckpt_a, device=dev, dtype=torch_dtype)
        t1 = time.perf_counter()
        with Progress(output, "gxs transplant", len(conditions), "conditions") as hook:
            result = run_transplant(model_a, src_a, src_b, arch_a, evaluator, conditions, donor, progress=hook,
                                    a=str(ckpt_a.path), b=str(ckpt_b.path))
    extra = {**_data_record(evaluator, precision), "threads": n_threads,
             "timing_seconds": {"load_and_baselines": t1 - t0, "conditions": time.perf_counter() - t1}}
    session.finish({"transplant": {**result.to_hdf5_tree(), **extra}}, [ckpt_a, ckpt_b], {**result.to_json(), **extra},
                   render_transplant, group="gxs")


def render_transplant(output: Any, s: dict) -> None:
    """Terminal view: paper 000 Table 3 layout plus the proof columns."""
    rows = []
    for c in s["conditions"]:
        proof = "—" if c["kind"] == "baseline" else (
            "[green]exact[/green]" if c["swapped_equal_B"] and c["rest_equal_A"] else "[red]FAILED[/red]")
        heads = ",".join(c["heads"]) if len(c["heads"]) <= 6 else f"{len(c['heads'])} heads"
        touched = ",".join(c["touched_query_heads"]) if len(c["touched_query_heads"]) <= 6 else f"{len(c['touched_query_heads'])}"
        rows.append([c["name"], heads or "—", touched or "—", c["params_swapped"], _pct(c["accuracy"]),
                     _pct(c["delta_accuracy"]), c["loss"], c["margin"], proof])
    output.table(
        f"gxs transplant — A = {s['a']}, B = {s['b']} ({s['architecture']}, eval {s['eval']}, n = {s['n']})",
        ["condition", "heads (L.H)", "touched q heads", "params swapped", "acc %", "Δ acc %", "loss", "margin", "proof"],
        rows,
        caption="proof: swapped slices equal B and every other element equals A, bit for bit, read from the live model",
    )
    output.print(f"B on its own: accuracy {100 * s['donor_accuracy']:.2f}%, loss {s['donor_loss']:.4g}; "
                 f"exact copy: {'yes' if s['exact_copy'] else '[red]no[/red]'}")
    render_facts(output, s)
    for note in s["notes"]:
        output.print(f"note: {note}")


# --------------------------------------------------------------------------------------------- velocity


@gxs_app.command("velocity")
def velocity_cmd(
    run_dir: RunDirArg,
    steps: StepsOpt = None,
    anchor: Annotated[int | None, typer.Option("--anchor", help="Step of the anchor checkpoint (default: the first); velocities start after it.")] = None,
    include_bias: Annotated[bool, typer.Option("--include-bias", help="Include the q/k (G) and v/o/MLP (S) biases.")] = False,
    role_map: RoleMapOpt = None,
    allow_partial_trunk: AllowPartialTrunkOpt = False,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Velocity ||theta_g(t) - theta_g(t_prev)|| / (t - t_prev) of Geometry (q, k) and Slack (v, o, MLP) over a run,
    from the backbone's streaming Gram; the consolidation step of each (velocity stays below 10% of its peak from
    then on) and which consolidates first.

    Example: ckptaudit gxs velocity runs/grok1/
    """
    from ckptaudit.analyses.gxs.run import run_velocity
    from ckptaudit.io.roles import load_role_map

    session = LocalSession("gxs velocity", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output, dev = session.output, session.device
    run = load_drift_run(run_dir, steps, anchor)
    if len(run.checkpoints) < 3:
        raise UsageError(f"{run_dir}: velocity needs at least 3 checkpoints, found {len(run.checkpoints)}",
                         "point it at a run directory, or widen --steps")
    rmap = load_role_map(role_map) if role_map is not None else None
    with Progress(output, "gxs velocity: reading checkpoints", None, "tensor reads") as hook:
        result = run_velocity(run, include_bias=include_bias, device=dev, role_map=rmap, anchor_step=anchor,
                              progress=hook, allow_partial_trunk=allow_partial_trunk)
    session.finish({"velocity": result.to_hdf5_tree()}, run.checkpoints, result.to_json(), render_velocity, group="gxs")


def render_velocity(output: Any, s: dict) -> None:
    """Terminal view: velocity per step, each relative to its group's peak, then the verdict."""
    from ckptaudit.report.console import sparkline

    peak_g = max((v for v in s["velocity_G"] if v is not None), default=None) or 1.0
    peak_s = max((v for v in s["velocity_S"] if v is not None), default=None) or 1.0
    rows = [[t, g, None if g is None else g / peak_g, v, None if v is None else v / peak_s]
            for t, g, v in zip(s["steps"], s["velocity_G"], s["velocity_S"], strict=True)]
    output.table(
        f"gxs velocity — {len(s['steps'])} steps after anchor {s['anchor_step']} (D_G = {s['dim_G']}, D_S = {s['dim_S']})",
        ["step", "nu_G", "nu_G / peak", "nu_S", "nu_S / peak"],
        rows,
        caption="nu = ||theta(t) - theta(t_prev)|| / (t - t_prev), parameter units per step",
    )
    output.print(f"G {sparkline(s['velocity_G'])}")
    output.print(f"S {sparkline(s['velocity_S'])}")
    output.print(f"consolidation (stays below 10% of peak): G at step {s['consolidation_step_G']}, "
                 f"S at step {s['consolidation_step_S']} — [bold]{s['order']}[/bold]")


# ------------------------------------------------------------------------------------------------ slack


@gxs_app.command("slack")
def slack_cmd(
    ckpt: CheckpointArg,
    alpha: Annotated[str, typer.Option("--alpha", help="Residual scales alpha, comma-separated.")] = "1,0.8,0.6,0.4,0.2",
    sigma: Annotated[str, typer.Option("--sigma", help="Noise levels sigma (x the residual's RMS), comma-separated.")] = "0,0.3,1,2,3",
    task: TaskOpt = None,
    data: DataOpt = None,
    split: SplitOpt = "validation",
    seq_len: SeqLenOpt = None,
    pack: PackOpt = False,
    eval_tokens: EvalTokensOpt = 65536,
    as_given: AsGivenOpt = False,
    max_sequences: MaxSeqOpt = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    plot: PlotOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Margin z_correct - max other logit over the eval set, under h' = alpha*h + sigma*rms(h)*eps on the final
    residual stream (after the final norm, before the unembedding; eps ~ N(0, I), seeded): accuracy and mean
    margin per (alpha, sigma) cell, and per alpha whether margin falls monotonically with sigma ("no gain reflex").

    Example: ckptaudit gxs slack runs/seed0/checkpoint-3000 --seed 1
    """
    from ckptaudit.analyses.gxs.run import run_slack
    from ckptaudit.io.models import load_model

    session = LocalSession("gxs slack", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output, dev = session.output, session.device
    alphas, sigmas = parse_floats(alpha, "--alpha", "1,0.5"), parse_floats(sigma, "--sigma", "0,1,3")
    if any(s < 0 for s in sigmas):
        raise UsageError("--sigma: noise levels must be >= 0", None)
    n_threads = apply_threads(threads)
    t0 = time.perf_counter()
    checkpoint = _last_checkpoint(ckpt)
    evaluator = _evaluator(task, data, split, checkpoint, max_sequences, as_given, window_spec(seq_len, pack, eval_tokens))
    from ckptaudit.io.precision import resolve_dtype

    torch_dtype, precision = resolve_dtype(dtype, checkpoint, dev)
    model = load_model(checkpoint, device=dev, dtype=torch_dtype)
    t1 = time.perf_counter()
    with Progress(output, "gxs slack", len(alphas) * len(sigmas) * evaluator.n_batches(), "batches") as hook:
        result = run_slack(model, evaluator, alphas, sigmas, seed=seed, progress=hook, checkpoint=str(checkpoint.path))
    extra = {**_data_record(evaluator, precision), "threads": n_threads,
             "timing_seconds": {"load": t1 - t0, "grid": time.perf_counter() - t1}}

    def figures(s: dict) -> None:
        from ckptaudit.report.plots import plot_slack, run_label

        label = f"{run_label(checkpoint.path, checkpoint=True)} (step {checkpoint.step})"
        output.note(f"figure written to [bold]{plot_slack(s, plot, label=label)}[/bold]")

    session.finish({"slack": {**result.to_hdf5_tree(), **extra}}, [checkpoint], {**result.to_json(), **extra},
                   render_slack, group="gxs", figures=None if plot is None else figures)


def _with_se(values: list, errors: list | None, scale: float = 1.0) -> list:
    """Grid row cells as "v ± se" (v alone without standard errors)."""
    if errors is None:
        return [scale * v for v in values]
    return [f"{fmt(scale * v)} ± {fmt(scale * e)}" for v, e in zip(values, errors, strict=True)]


def render_slack(output: Any, s: dict) -> None:
    """Terminal view: accuracy and mean margin grids (rows alpha, columns sigma), each cell ± its standard error
    over the input sequences."""
    cols = ["alpha \\ sigma", *(f"{x:g}" for x in s["sigma"])]
    acc_se, m_se = s.get("accuracy_se"), s.get("margin_se")
    se_note = (f"± standard error over the {s['n_units']} input sequences (each with its own noise)"
               if acc_se is not None else "one input sequence: no standard error")
    output.table(f"gxs slack — accuracy % ({s['eval']}, n = {s['n']}, hook: {s['site']} {s['site_kind']})", cols,
                 [[f"{a:g}", *_with_se(row, None if acc_se is None else acc_se[i], 100.0)]
                  for i, (a, row) in enumerate(zip(s["alpha"], s["accuracy"], strict=True))], caption=se_note)
    output.table("gxs slack — mean margin z_correct - max other", [*cols, "no gain reflex"],
                 [[f"{a:g}", *_with_se(row, None if m_se is None else m_se[i]), ok]
                  for i, (a, row, ok) in enumerate(zip(s["alpha"], s["margin"], s["no_gain_reflex"], strict=True))],
                 caption="no gain reflex: margin does not rise with sigma at that alpha (the model draws down a fixed "
                         "buffer); " + se_note)
    render_facts(output, s)
