"""`ckptaudit fisher RUN_OR_CKPT`: empirical-Fisher Rayleigh quotients along trajectory directions (SPEC §2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import Progress, Session, render_facts
from ckptaudit.cli.options import (
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    PackOpt,
    PlotOpt,
    QuietOpt,
    RevisionsOpt,
    RunDirArg,
    SeedOpt,
    SeqLenOpt,
    StepsOpt,
    TaskOpt,
    ThreadsOpt,
    TrainTokensOpt,
)
from ckptaudit.errors import UsageError
from ckptaudit.report.console import fmt, sparkline


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
        int, typer.Option("--random", min=1, help="Number K of random unit directions orthogonal to v_b and each other (seeded; never held in memory).")
    ] = 10,
    block: Annotated[int | None, typer.Option("--block", help="Restrict gradients and directions to this block.")] = None,
    include_bias: Annotated[bool, typer.Option(
        "--include-bias", help="Include attention/MLP biases in the trunk (vectors from `backbone --include-bias`).")] = False,
    hessian: Annotated[
        bool, typer.Option("--hessian", help="Also compute the true curvature v^T H v by Hessian-vector products.")
    ] = False,
    memory_budget: Annotated[
        str, typer.Option("--memory-budget", help="RAM for the M stored gradients (e.g. 2G), and as much again for the directions; beyond it they go to a disk memmap.")
    ] = "2G",
    top: Annotated[int, typer.Option("--top", min=1, help="How many Fisher eigenvalues to report.")] = 10,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap replicates over the M mini-batches for the standard "
                          "errors and 95% intervals of q, alpha, lambda_1, the effective rank, the overlap and the "
                          "cosines (0: none; seeded by --seed).")
    ] = 200,
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
    plot: PlotOpt = None,
) -> None:
    """Empirical-Fisher Rayleigh quotients q(v) = (1/M) sum_i <g_i, v>^2 of the trunk gradients along the backbone,
    the switching direction, PC2..PC6 and random directions; anisotropy with its exact expectation, the Fisher
    trace, top Fisher eigenvalues (M x M Gram), gradient-backbone cosines and signed projections, per-block signed
    projections, the stiffening curve over checkpoints, and with --hessian the true curvature; standard errors
    and a seeded bootstrap over batches beside the numbers. Never forms the D x D Fisher.

    Example: ckptaudit fisher runs/seed42/ --steps 1000,5000,9000 --vectors backbone.safetensors
    """
    from ckptaudit import api

    # Under torchrun rank i % WORLD_SIZE takes mini-batch i; rank 0 alone prints and writes.
    with Session("fisher", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash) as session:
        output, main = session.output, session.main
        with Progress(output, "fisher: backbone from the run", None, "tensor reads") as hook:
            report = api.fisher(
                run_dir, steps=steps, revisions=revisions, vectors=vectors, backbone_run=run, switch=switch,
                batches=batches, batch_size=batch_size, n_random=n_random, block=block, include_bias=include_bias,
                hessian=hessian, memory_budget=memory_budget, top=top, task=task, data=data, seq_len=seq_len, pack=pack,
                train_tokens=train_tokens, dtype=dtype, threads=threads, seed=seed, bootstrap=bootstrap, device=session.device,
                progress=hook if main else None, _note=output.note,
            )  # fmt: skip
    if not main:
        return
    summary = session.finish(report.to_hdf5_tree(), report.inputs, report.to_json(), render_fisher)
    if plot is not None:
        from ckptaudit.report.plots import plot_fisher

        written = plot_fisher(summary, plot)
        output.note(f"figures written to [bold]{plot}[/bold] ({len(written)} files)")


def _interval(c: dict, key: str) -> str | None:
    """The bootstrap interval of ``key`` at checkpoint ``c`` as "lo–hi" (None without a bootstrap)."""
    b = c.get("bootstrap")
    if not b or b["ci_low"].get(key) is None:
        return None
    return f"{fmt(b['ci_low'][key])}–{fmt(b['ci_high'][key])}"


def render_fisher(output: Any, s: dict) -> None:
    """Terminal view: quotients per checkpoint, the anisotropy against its exact value and its errors, the spectrum,
    the gradient projections on the backbone, the stiffening curve, running sums."""
    cks = s["checkpoints"]
    names = [k for k in cks[0]["q"] if k != "random_mean"] + ["random_mean"]
    short = {"backbone": "v_b", "switch": "v_sw", "random_mean": "random"}
    settings = s["settings"]
    what = "trunk" if settings.get("block") is None else f"block {settings['block']}"
    boot = next((c["bootstrap"] for c in cks if c.get("bootstrap")), None)
    level = f"{100 * boot['level']:g}%" if boot else "95%"
    how = (f"bootstrap over the {settings['batches']} batches ({boot['n_boot']} replicates, seed {boot['seed']})"
           if boot else "no bootstrap (--bootstrap 0)")
    output.table(
        f"fisher — {what}, D = {s['dim']}, M = {settings['batches']} batches of {settings['batch_size']}",
        ["step", *[f"q({short.get(n, n)})" for n in names], "± se q(v_b)", f"{level} q(v_b)"],
        [[c["step"], *[c["q"].get(n) for n in names], c["q_se"].get("backbone"), _interval(c, "q_backbone")]
         for c in cks],
        caption="q(v) = (1/M) sum_i <g_i, v>^2; random = mean over the K random directions; ± se over batches "
                f"(std / sqrt(M)); intervals here and below: {how}",
    )
    output.table(
        "anisotropy alpha = q(v_b) / q(random): sampled against exact",
        ["step", "alpha", "± se (K dirs)", f"{level} (batches)", "std q(w_k)", "se mean", "se exact",
         "E q(w)", "std exact", "alpha exact", f"{level} (batches)"],
        [[c["step"], c["anisotropy"], c["anisotropy_se"], _interval(c, "anisotropy"), c["q_random_std"],
          c["q_random_se"], c["q_random_se_exact"], c["random_expected"], c["q_random_std_exact"],
          c["anisotropy_exact"], _interval(c, "anisotropy_exact")] for c in cks],
        caption="± se (K dirs) = alpha · se mean / q(random), se mean = std(q(w_k), ddof 1)/sqrt(K); exact: w uniform "
                "on the unit sphere orthogonal to v_b, E q(w) = (tr F - q(v_b))/(D-1), its std, and se exact of the "
                "mean of K orthonormal directions; alpha exact = q(v_b) / E q(w)",
    )
    output.table(
        "Fisher spectrum (M x M Gram) and gradient-backbone alignment",
        ["step", "tr F ± se", "lambda_1", f"{level}", "lambda_2", "eff. rank", f"{level}", "|<u_1,v_b>|", f"{level}",
         "mean |cos(g,v_b)| ± se", "std", "noise floor"],
        [[c["step"], _pm(c["trace"], c["trace_se"]), (c["top_eigenvalues"] + [None])[0], _interval(c, "lambda_1"),
          (c["top_eigenvalues"] + [None, None])[1], c["effective_rank"], _interval(c, "effective_rank"),
          c["top_overlap_backbone"], _interval(c, "top_overlap_backbone"),
          _pm(c["grad_backbone_cos_mean"], c["grad_backbone_cos_se"]), c["grad_backbone_cos_std"], c["noise_floor"]]
         for c in cks],
        caption="tr F = (1/M) sum_i ||g_i||^2 = the sum of the eigenvalues; eff. rank = (sum s)^2 / sum s^2 over the "
                "Gram eigenvalues; noise floor = sqrt(2/(pi D))",
    )
    blocks = list(cks[0]["block_signed_projection"])
    output.table(
        "signed gradient projection on the backbone",
        ["step", "mean <g,v_b> ± se", "std", "mean cos", "std", *[f"blk {b} <g_l,v_b^l>" for b in blocks]],
        [[c["step"], _pm(c["grad_backbone_projection_mean"], c["grad_backbone_projection_se"]),
          c["grad_backbone_projection_std"], c["grad_backbone_cos_signed_mean"], c["grad_backbone_cos_signed_std"],
          *[_pm(c["block_projection_mean"].get(b), c["block_projection_std"].get(b)) for b in blocks]] for c in cks],
        caption="signed, over batches (std: population); per block: mean ± std of the raw <g_{i,l}, v_b^(l)> "
                "(gradient units); b_l below is the same divided by ||g_{i,l}||",
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
    output.print(f"block signed projection b_l, running sum B_l at the last step: {runs}")
    raw = s.get("block_projection_running_sum") or {}
    if raw:
        output.print("raw block projection <g_l, v_b^l>, running sum at the last step: "
                     + ", ".join(f"{b}: {v[-1]:+.3g}" for b, v in raw.items()))
    if s.get("direction_cosines"):
        output.print("<v_b, v> of the probe directions: "
                     + ", ".join(f"{short.get(n, n)} {fmt(v)}" for n, v in s["direction_cosines"].items()))
    pair = s.get("switch_pair")
    if pair:
        output.print(f"switch pair peak {pair['peak']} / trough {pair['trough']}: "
                     + ", ".join(f"{k} ratio {fmt(pair[k]['ratio'])}" for k in ("lambda_1", "trace", "q_backbone")))
    render_facts(output, {**settings, "train_data": (settings.get("data") or {}).get("selection")})


def _pm(mean: float | None, std: float | None) -> str | None:
    return None if mean is None else f"{fmt(mean)} ± {fmt(std)}"
