"""`ckptaudit inspect PATH`: checkpoints, parameters by role, Level-2 artifacts, file safety."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession, Progress
from ckptaudit.cli.options import (
    JsonOpt,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    QuietOpt,
    RevisionsOpt,
    RoleMapOpt,
    RunDirArg,
    StepsOpt,
)
from ckptaudit.report.console import human_bytes


@app.command()
def inspect(
    path: RunDirArg,
    steps: StepsOpt = None,
    revisions: RevisionsOpt = None,
    role_map: RoleMapOpt = None,
    no_file_check: Annotated[
        bool, typer.Option("--no-file-check", help="Skip the per-file safe-format check (faster on huge runs).")
    ] = False,
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List a run's checkpoints: steps, parameters per role and block, dtypes, bytes, Level-2 artifacts
    (optimizer moments, scheduler, trainer state with lr history, RNG state) and whether every file is safe to load.

    Example: ckptaudit inspect runs/seed42/
    """
    from ckptaudit import api

    session = LocalSession("inspect", None, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output = session.output
    with Progress(output, "inspecting", None, "checkpoints") as hook:
        result = api.inspect(path, steps=steps, revisions=revisions, role_map=role_map, file_check=not no_file_check,
                             progress=hook, _note=output.note)
    session.finish(result.to_hdf5_tree(), result.inputs, result.to_json(), render_inspect)


def _exempt(f: dict) -> bool:
    from ckptaudit.io.safety import DEFAULT_EXEMPT_FILES

    return f["verdict"] != "unreadable" and Path(f["path"]).name in DEFAULT_EXEMPT_FILES


def _safe_cell(files: list[dict]) -> str:
    """"yes", "no", or "yes (n exempt)" when the only unsafe files are those the default gate policy exempts."""
    unsafe = [f for f in files if not f["safe"]]
    if not unsafe:
        return "[green]yes[/green]"
    if all(_exempt(f) for f in unsafe):
        return f"[green]yes[/green] ({len(unsafe)} exempt)"
    return "[red]no[/red]"


def _folder(path: str) -> str:
    """The checkpoint folder of a file (``checkpoint-30``), or the file for single-file checkpoints."""
    p = Path(path)
    return p.parent.name or p.name


def file_findings(checkpoints: list[dict]) -> list[str]:
    """One line per kind of unsafe or unreadable file, however many checkpoints hold it: the file name, the
    verdict, in how many checkpoints (first and last), the reason; for the files the default gate policy exempts,
    why they are exempt. ``checkpoints``: the ``checkpoints`` entries of inspect's JSON document."""
    from rich.markup import escape

    from ckptaudit.io.safety import DEFAULT_EXEMPT_FILES, EXEMPT_REASON

    groups: dict[tuple[str, str, str], list[dict]] = {}
    for c in checkpoints:
        for f in c["files"]:
            if not f["safe"]:
                groups.setdefault((Path(f["path"]).name, f["verdict"], f["detail"]), []).append(f)
    lines = []
    for (name, verdict, detail), files in groups.items():
        paths = [f["path"] for f in files]
        what = "unreadable file" if verdict == "unreadable" else f"unsafe file ({verdict})"
        where = (escape(paths[0]) if len(paths) == 1 else
                 f"{escape(name)} in {len(paths)} checkpoints ({escape(_folder(paths[0]))} … {escape(_folder(paths[-1]))})")
        if verdict != "unreadable" and name in DEFAULT_EXEMPT_FILES:
            names = [g.rsplit(".", 1)[-1] for g in files[0]["globals"]]
            shown = ", ".join(names[:2]) + (f" +{len(names) - 2} more" if len(names) > 2 else "")
            lines.append(f"[yellow]note:[/yellow] {where} is a pickle that torch.load could read only by trusting "
                         f"named classes ({verdict}: {escape(shown)}); {EXEMPT_REASON}")
        else:
            lines.append(f"[red]{what}[/red] {where}: {escape(detail)}")
    return lines


def render_inspect(output, s: dict) -> None:
    """Terminal view of inspect's JSON document."""
    from rich.markup import escape

    yes = lambda b: "[green]yes[/green]" if b else "[red]no[/red]"  # noqa: E731
    rows = []
    for c in s["checkpoints"]:
        a = c["artifacts"]
        rows.append([c["step"], c["layout"], f"{c['n_params']:,}", human_bytes(c["bytes"]), ", ".join(sorted(c["dtypes"])),
                     yes(a.get("optimizer")), yes(a.get("scheduler")), yes(a.get("trainer_state")),
                     yes(a.get("rng_state")), _safe_cell(c["files"]) if c["files"] else "—"])  # fmt: skip
    output.table(
        escape(f"{s['run']} — {len(s['checkpoints'])} checkpoint(s), architecture: {s['architecture']}"),
        ["step", "layout", "params", "bytes", "dtypes", "optimizer", "scheduler", "trainer state", "rng", "safe files"],
        rows,
    )
    last = s["checkpoints"][-1]
    if last["params_by_role"]:
        output.table(
            f"parameters by role (step {last['step']})",
            ["role", "params"],
            [[r, f"{n:,}"] for r, n in last["params_by_role"].items()],
        )
    shared = last.get("shared_tensors") or {}
    if shared:
        pairs = ", ".join(f"{a} = {b}" for a, b in list(shared.items())[:4])
        output.print(f"tensors stored twice with one storage (tied), counted once: {pairs}"
                     + (f" (+{len(shared) - 4} more)" if len(shared) > 4 else ""))
    if s.get("architecture_recognised_by"):
        output.print(f"architecture {s['architecture']}: recognised by {s['architecture_recognised_by']}")
    if s.get("hyperparameters"):
        output.table(
            f"training hyper-parameters (step {last['step']})",
            ["hyper-parameter", "value", "from"],
            [[escape(k), escape(v["value"]) if isinstance(v["value"], str) else v["value"], v["source"]]
             for k, v in s["hyperparameters"].items()],
        )
    for note in s.get("hyperparameter_notes") or []:
        output.print(f"[yellow]note:[/yellow] {escape(note)}")
    if s.get("architecture_note"):
        output.print(f"[yellow]roles not resolved:[/yellow] {escape(s['architecture_note'])}")
    for line in file_findings(s["checkpoints"]):
        output.print(line)
    if s["provenance_complete"]:
        output.print("[green]provenance complete[/green]: every checkpoint carries optimizer, scheduler, trainer state and RNG state")
    else:
        output.print(
            f"[red]provenance incomplete[/red] (missing: {', '.join(s['missing'])}): resuming or fine-tuning "
            "from these weights cannot reproduce the training state"
        )
