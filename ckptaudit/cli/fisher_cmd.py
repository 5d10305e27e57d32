"""`ckptaudit fisher RUN_OR_CKPT`: empirical-Fisher Rayleigh quotients along trajectory directions (SPEC §2)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import Progress, Session, load_run, render_facts
from ckptaudit.cli.options import (
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    PackOpt,
    QuietOpt,
    RevisionsOpt,
    RunDirArg,
    SeedOpt,
    SeqLenOpt,
    StepsOpt,
    TaskOpt,
    ThreadsOpt,
    TrainTokensOpt,
    apply_threads,
    parse_switch,
    window_spec,
)
from ckptaudit.errors import UsageError
from ckptaudit.report.console import sparkline


def parse_bytes(spec: str) -> int:
    """'2G', '512M', '1.5GB', '100000' -> bytes (powers of 1024)."""
    s = spec.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    from ckptaudit.io.numbers import INT64_MAX, parse_float

    bad = UsageError(f"--memory-budget {spec}: expected a positive size like 2G, 512M or a number of bytes")
    number, unit = (s[:-1], units[s[-1]]) if s and s[-1] in units else (s, 1)
    try:
        value = parse_float(number, "--memory-budget") * unit
    except UsageError:
        raise bad from None
    if not 0 < value <= INT64_MAX:
        raise bad
    return int(value)


@app.command()
def fisher(
    run_dir: RunDirArg,
    steps: StepsOpt = None,
    revisions: RevisionsOpt = None,
    vectors: Annotated[
        Path | None,
        typer.Option("--vectors", help="Backbone vectors from `ckptaudit backbone --save-vectors` (v_b, PC2..PC6)."),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option("--run", "--backbone-run",
                     help="Run directory to compute the backbone from on the fly (default: RUN_OR_CKPT when it is a run). "
                          "Under torchrun write --backbone-run: torchrun itself rejects --run."),
    ] = None,
    switch: Annotated[
        str | None,
        typer.Option("--switch", help="Switching direction PEAK:TROUGH, two checkpoint steps of the run."),
    ] = None,
    batches: Annotated[int, typer.Option("--batches", min=1, help="Number M of mini-batch gradients per checkpoint.")] = 32,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, help="Sequences per mini-batch (default: the run's training batch size, else 32)."),
    ] = None,
    n_random: Annotated[
        int, typer.Option("--random", min=1, help="Number K of random unit directions orthogonal to v_b and each other.")
    ] = 10,
    block: Annotated[int | None, typer.Option("--block", help="Restrict gradients and directions to this block.")] = None,
    include_bias: Annotated[bool, typer.Option(
        "--include-bias", help="Include attention/MLP biases in the trunk (vectors from `backbone --include-bias`).")] = False,
    hessian: Annotated[
        bool, typer.Option("--hessian", help="Also compute the true curvature v^T H v by Hessian-vector products.")
    ] = False,
    memory_budget: Annotated[
        str, typer.Option("--memory-budget", help="RAM for the M stored gradients (e.g. 2G); beyond it they go to a disk memmap.")
    ] = "2G",
    top: Annotated[int, typer.Option("--top", min=1, help="How many Fisher eigenvalues to report.")] = 10,
    task: TaskOpt = None,
    data: DataOpt = None,
    seq_len: SeqLenOpt = None,
    pack: PackOpt = False,
    train_tokens: TrainTokensOpt = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Empirical-Fisher Rayleigh quotients q(v) = (1/M) sum_i <g_i, v>^2 of the trunk gradients along the backbone,
    the switching direction, PC2..PC6 and random directions; anisotropy, top Fisher eigenvalues (M x M Gram),
    gradient-backbone cosines, per-block signed projections, the stiffening curve over checkpoints, and with
    --hessian the true curvature. Never forms the D x D Fisher.

    Example: ckptaudit fisher runs/seed42/ --steps 1000,5000,9000 --vectors backbone.safetensors
    """
    from ckptaudit.analyses.backbone import run_backbone
    from ckptaudit.analyses.fisher import FisherSettings, run_fisher

    if vectors is not None and run is not None:
        raise UsageError("give either --vectors or --run, not both")
    # Under torchrun rank i % WORLD_SIZE takes mini-batch i; rank 0 alone prints and writes.
    with Session("fisher", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash) as session:
        ctx, output, dev, main = session.ctx, session.output, session.device, session.main
        n_threads = apply_threads(threads)
        t_start = time.perf_counter()
        targets = load_run(run_dir, steps, revisions)
        source_run = load_run(run) if run is not None else None
        if source_run is None and (vectors is None or switch is not None):
            whole = load_run(run_dir, revisions=revisions)
            if len(whole.checkpoints) >= 3:
                source_run = whole
        if vectors is None and source_run is None:
            raise UsageError(f"{run_dir}: no backbone direction: a single checkpoint needs --vectors or --run",
                             "e.g. --vectors backbone.safetensors (from `ckptaudit backbone --save-vectors`)")
        settings = FisherSettings(batches=batches, batch_size=batch_size, n_random=n_random, block=block,
                                  include_bias=include_bias,
                                  hessian=hessian, memory_budget=parse_bytes(memory_budget), seed=seed, top=top,
                                  device=dev)
        pair = parse_switch(switch) if switch is not None else None
        share = batches if ctx is None else len(range(ctx.rank, batches, ctx.world_size))  # this rank's batches
        with tempfile.TemporaryDirectory(prefix="ckptaudit-fisher-") as tmp:
            vec_path = vectors
            if vec_path is None:
                vec_path = Path(tmp) / "backbone.safetensors"
                # Under torchrun the backbone pass splits its tensors across the ranks and rank 0 writes the
                # vectors; the file then goes to every rank (temporary directories need not be shared).
                with Progress(output, "fisher: backbone from the run", None, "tensor reads") as hook:
                    run_backbone(source_run, device=dev, save_vectors=vec_path, top_k_vectors=6, include_bias=include_bias,
                                 progress=hook if main else None)
                if ctx is not None:
                    broadcast_file(ctx, vec_path)
                output.note(f"backbone computed from {source_run.path} ({len(source_run.checkpoints)} checkpoints)")
            with Progress(output, "fisher: gradients", share * len(targets.checkpoints), "gradients") as hook:
                report = run_fisher(targets.checkpoints, settings, vec_path, task=task, data=data, seq_len=seq_len,
                                    switch=pair, switch_run=source_run, progress=hook if main else None,
                                    windows=window_spec(seq_len, pack, None, train_tokens, seed), dtype=dtype)
            report.settings["threads"] = n_threads
            report.settings["timing_seconds"] = {"total": time.perf_counter() - t_start,
                                                 **{f"step_{c.step}": c.seconds for c in report.checkpoints}}
            if vectors is None:  # name the run the directions came from, not the temporary file
                report.settings["vectors"] = f"backbone of {source_run.path}"
    if not main:
        return
    session.finish(report.to_hdf5_tree(), targets.checkpoints, report.to_json(), render_fisher)


def broadcast_file(ctx: Any, path: Path, chunk: int = 1 << 26) -> None:
    """Copy rank 0's file ``path`` to ``path`` on every other rank of ``ctx``, ``chunk`` bytes at a time."""
    import numpy as np

    size = ctx.broadcast(np.array([path.stat().st_size if ctx.is_main else 0], dtype=np.int64))
    size = int(size[0])
    with open(path, "rb" if ctx.is_main else "wb") as f:
        for lo in range(0, size, chunk):
            n = min(chunk, size - lo)
            buf = np.frombuffer(f.read(n), dtype=np.uint8) if ctx.is_main else np.zeros(n, dtype=np.uint8)
            buf = ctx.broadcast(buf)
            if not ctx.is_main:
                f.write(buf.tobytes())


def render_fisher(output: Any, s: dict) -> None:
    """Terminal view: quotients per checkpoint, the spectrum per checkpoint, the stiffening curve, running sums."""
    cks = s["checkpoints"]
    names = [k for k in cks[0]["q"] if k != "random_mean"] + ["random_mean"]
    short = {"backbone": "v_b", "switch": "v_sw", "random_mean": "random"}
    settings = s["settings"]
    what = "trunk" if settings.get("block") is None else f"block {settings['block']}"
    output.table(
        f"fisher — {what}, D = {s['dim']}, M = {settings['batches']} batches of {settings['batch_size']}",
        ["step", *[f"q({short.get(n, n)})" for n in names], "alpha"],
        [[c["step"], *[c["q"].get(n) for n in names], c["anisotropy"]] for c in cks],
        caption="q(v) = (1/M) sum_i <g_i, v>^2; random = mean over the random directions; alpha = q(v_b) / q(random)",
    )
    output.table(
        "anisotropy: sampled against exact",
        ["step", "alpha", "std. error", "E q(w) = (tr F - q(v_b))/(D-1)", "alpha exact"],
        [[c["step"], c["anisotropy"], c["anisotropy_se"], c["random_expected"], c["anisotropy_exact"]] for c in cks],
        caption="std. error from the spread of the K random quotients; alpha exact = q(v_b) / E q(w) over all unit w orthogonal to v_b",
    )
    output.table(
        "Fisher spectrum (M x M Gram) and gradient-backbone alignment",
        ["step", "lambda_1", "lambda_2", "eff. rank", "|<u_1,v_b>|", "mean |cos(g,v_b)|", "std", "noise floor"],
        [[c["step"], *(c["top_eigenvalues"] + [None, None])[:2], c["effective_rank"], c["top_overlap_backbone"],
          c["grad_backbone_cos_mean"], c["grad_backbone_cos_std"], c["noise_floor"]] for c in cks],
        caption="eff. rank = (sum s)^2 / sum s^2 over the Gram eigenvalues; noise floor = sqrt(2/(pi D))",
    )
    if s.get("hessian"):
        hn = [k for k in s["hessian"][0] if k != "step"]
        output.table("curvature v^T H v (Hessian-vector products on the same batches)",
                     ["step", *[short.get(n, n) for n in hn]], [[h["step"], *[h.get(n) for n in hn]] for h in s["hessian"]])
    st = s["stiffening"]
    if len(st["steps"]) > 1:
        qb, al = st["q_backbone"], st["anisotropy"]
        output.print(f"q(v_b)(t)  {sparkline(qb)}  {qb[0]:.3g} → {qb[-1]:.3g}   (steps {st['steps'][0]}…{st['steps'][-1]})")
        if all(a is not None for a in al):
            output.print(f"alpha(t)   {sparkline(al)}  {al[0]:.3g} → {al[-1]:.3g}")
    runs = ", ".join(f"{b}: {v[-1]:+.3g}" for b, v in s["block_running_sum"].items())
    output.print(f"block signed projection, running sum B_l at the last step: {runs}")
    render_facts(output, {**settings, "train_data": (settings.get("data") or {}).get("selection")})
