"""`ckptaudit classify-embeddings MODEL` (SPEC §5; paper 002 section 6)."""

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
    PlotOpt,
    QuietOpt,
    SeedOpt,
)
from ckptaudit.errors import DataError, InputNotFoundError
from ckptaudit.io.models import load_tokenizer


class _ModelInput:
    """What save_report needs to list a model in /inputs."""

    def __init__(self, path: Path):
        from ckptaudit.io.tensors import open_tensors

        self.step = 0
        self.path = path
        with open_tensors(path) as src:
            self.weight_files = tuple(src.files())


def excluded_token_ids(spec: str, path: Path, vocab_size: int) -> set[int]:
    """Token ids to leave out of the bulk statistics.

    ``tokenizer``: the tokenizer's special tokens and rows beyond its vocabulary (padding rows of the matrix);
    a file: JSON list or one id per line of the ids to KEEP (everything else is excluded).
    """
    if spec == "tokenizer":
        tok = load_tokenizer(path)
        excluded = set(int(i) for i in tok.all_special_ids)
        excluded.update(range(len(tok), vocab_size))
        return excluded
    f = Path(spec)
    if not f.exists():
        raise InputNotFoundError(f"--tokens-from {spec}: no such file", "pass 'tokenizer' or a file of token ids to keep")
    from ckptaudit.io.jsonio import loads_bounded
    from ckptaudit.io.numbers import is_int_text

    bad = DataError(f"{f}: expected a JSON list or whitespace-separated integer token ids", None)
    try:
        text = f.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise bad from None
    keep = loads_bounded(text, str(f), error=DataError) if text.startswith("[") else text.split()
    if not isinstance(keep, list) or not all(
            (isinstance(i, int) and not isinstance(i, bool)) or (isinstance(i, str) and is_int_text(i)) for i in keep):
        raise bad
    keep_set = {int(i) for i in keep}
    return set(range(vocab_size)) - keep_set


@app.command("classify-embeddings")
def classify_embeddings(
    model: ModelArg,
    pairs: Annotated[int, typer.Option("--pairs", min=100, help="Random token pairs to sample (ignored with --exact).")] = 200_000,
    exact: Annotated[
        bool, typer.Option("--exact", help="All pairs, in tiles on the device, streamed into a histogram (no V x V matrix).")
    ] = False,
    lora_lr: Annotated[
        float, typer.Option("--lora-lr", help="LoRA learning rate used for the predicted critical rate eta_c = lr / h_class.")
    ] = 2e-4,
    tokens_from: Annotated[
        str | None,
        typer.Option(
            "--tokens-from",
            help="'tokenizer' to exclude special tokens and padding rows, or a file of token ids to keep (JSON list or one per line).",
        ),
    ] = None,
    tile: Annotated[int, typer.Option("--tile", min=64, help="Rows per tile in --exact mode (memory ~ tile^2).")] = 4096,
    bootstrap: Annotated[
        int,
        typer.Option("--bootstrap", min=0,
                     help="Bootstrap replicates over the sampled pairs for the intervals of every statistic (0: standard errors only; seeded by --seed)."),
    ] = 200,
    plot: PlotOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Bulk geometry of the normalised input embeddings (and the LM head when untied): squared-cosine overlap
    statistics, KS against fitted Gaussian and exponential laws, the class (A: dense Gaussian bulk, B: sparse
    exponential bulk) with a continuous bulk index, LoRA sufficiency and the predicted critical LoRA learning rate.

    Example: ckptaudit classify-embeddings models/smollm-135m --exact
    """
    from ckptaudit import api

    session = LocalSession("classify-embeddings", device, json_out, quiet, out=out, no_report=no_report,
                           no_hash=no_hash)
    output = session.output
    with Progress(output, "embed: overlaps", None, "pairs") as hook:
        report = api.classify_embeddings(model, pairs=pairs, exact=exact, lora_lr=lora_lr, tokens_from=tokens_from,
                                         tile=tile, bootstrap=bootstrap, seed=seed, device=session.device, progress=hook)
    path = report.path

    def figures(s: dict) -> None:
        from ckptaudit.report.plots import plot_embeddings, run_label

        written = plot_embeddings(s, plot, label=run_label(path, checkpoint=True))
        output.note(f"figures written to [bold]{plot}[/bold] ({len(written)} files)")

    session.finish(report.to_hdf5_tree(), report.inputs, report.to_json(),
                   lambda out, s: render_embeddings(out, s, str(path)), group="embeddings",
                   figures=None if plot is None else figures)


def render_embeddings(output: Any, s: dict, label: str) -> None:
    """Terminal view of classify-embeddings' JSON document: the input embeddings (the document itself) and the
    LM head when untied (its ``head`` entry)."""
    from ckptaudit.analyses.embeddings.run import H_CLASS

    embed = {k: v for k, v in s.items() if k != "head"}
    results = {"embed": embed, **({"head": s["head"]} if s.get("head") else {})}
    rows = [[role, j["vocab_size"], j["dim"], j["pairs"], j["mean_c2"], j["std_c2"], j["frac_abs_c_gt_0_3"],
             j["ks_gauss"], j["ks_exp"], j["bulk_index"], j["class"]] for role, j in results.items()]
    output.table(
        f"embedding bulk — {label}",
        ["matrix", "V", "d", "pairs", "mean c²", "std c²", "|c|>0.3", "KS gauss", "KS exp", "bulk index", "class"],
        rows,
        caption="class A = dense Gaussian bulk (KS_gauss < KS_exp), B = sparse exponential bulk; bulk index = KS_exp - KS_gauss",
    )
    for role, j in results.items():
        output.print(f"{role}: {uncertainty_line(j.get('uncertainty'))}")
    verdict = "sufficient" if embed["lora_sufficient"] else "predicted insufficient for high-overlap targets"
    lora_lr = embed["predicted_critical_lora_lr"] * H_CLASS[embed["class"]]
    output.print(
        f"LoRA: {verdict}; predicted critical LoRA lr = {embed['predicted_critical_lora_lr']:.3g} "
        f"(= {lora_lr:.4g} / h_{embed['class']}; h_A = 1.69, h_B = 10.0 are empirical constants of paper 002)"
    )


def uncertainty_line(u: dict | None) -> str:
    """One line: the sampling error of the headline numbers (or why there is none)."""
    from ckptaudit.report.console import fmt

    if not u or not u.get("standard_error"):
        return (u or {}).get("method", "no uncertainty")
    se = u["standard_error"]
    parts = [f"mean c² ± {fmt(se['mean_c2'])}", f"|c|>0.3 ± {fmt(se['frac_abs_c_gt_0_3'])}"]
    b = u.get("bootstrap")
    if b:
        pct = f"{100 * b['level']:g}%"
        parts += [f"{k} {pct} {fmt(b[k]['ci'][0])}–{fmt(b[k]['ci'][1])}" for k in ("ks_gauss", "ks_exp", "bulk_index")]
        parts.append(f"class agreement {fmt(b['class_agreement'])} ({b['n_boot']} bootstrap replicates, seed {b['seed']})")
    return f"{u['method']}: " + ", ".join(parts)
