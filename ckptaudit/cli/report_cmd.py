"""`ckptaudit report show FILE.h5`: render a saved report again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape

from ckptaudit.cli.app import AuditGroup, app
from ckptaudit.cli.common import LocalSession
from ckptaudit.cli.options import JsonOpt, QuietOpt

report_app = typer.Typer(
    cls=AuditGroup, help="Work with saved HDF5 reports.", no_args_is_help=True, add_completion=False
)
app.add_typer(report_app, name="report")


@report_app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="An HDF5 report written by a ckptaudit command.")],
    brief: Annotated[bool, typer.Option("--brief", help="Only attributes and short datasets; skip long arrays.")] = False,
    tree_view: Annotated[
        bool, typer.Option("--tree", help="Show every group and dataset of the file instead of the command's own view.")
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Render a saved report again: its provenance (command, argv, inputs), then the command's own tables as it
    printed them (from the --json document the report keeps), or with --tree (and for reports of older versions)
    every group of results. --json prints the command's own JSON document.

    Example: ckptaudit backbone runs/seed42/ --out backbone.h5 && ckptaudit report show backbone.h5
    """
    from rich.markup import escape

    from ckptaudit.report.hdf5 import SUMMARY_DATASET, read_report

    output = LocalSession("report show", None, json_out, quiet).output
    tree = read_report(path)
    summary = _stored_summary(tree.pop(SUMMARY_DATASET, None), path)
    attrs = tree["@attrs"]
    command = str(attrs.get("command"))
    output.json(summary if summary is not None and not tree_view else tree)  # Output.json makes it JSON
    if not output.human:
        return
    a = {k: escape(str(attrs.get(k))) for k in ("ckptaudit_version", "command", "created", "device", "schema_version",
                                                 "torch_version")}
    output.print(
        f"[bold]{escape(str(path))}[/bold]: ckptaudit {a['ckptaudit_version']} [bold]{a['command']}[/bold], "
        f"created {a['created']} on {a['device']} (schema {a['schema_version']}, torch {a['torch_version']})"
    )
    output.print(f"argv: {escape(_argv(attrs.get('argv', '[]')))}")
    inputs = tree.get("inputs", {})
    cols = [inputs.get(k) for k in ("step", "path", "bytes", "sha256")]
    if all(isinstance(c, np.ndarray) for c in cols) and len(cols[0]):
        output.table(
            "inputs",
            ["step", "path", "bytes", "sha256"],
            [
                [escape(_fmt(s)), escape(str(p)), escape(_fmt(b)), escape(str(h)[:16] + "…") if h else "—"]
                for s, p, b, h in zip(*cols)
            ],
        )
    render = None if tree_view or summary is None else command_views().get(command)
    if render is not None:
        render(output, summary, _run_label(cols[1]))
        return
    if summary is None and not tree_view:
        output.print("[yellow]note:[/yellow] this report keeps no terminal view (written before ckptaudit stored "
                     "one); showing its groups")
    for key, val in tree.items():
        if key in ("@attrs", "inputs"):
            continue
        _render_group(output, key, val, brief)


def command_views() -> dict[str, Any]:
    """command name -> ``view(output, summary, label)``: the terminal view each command prints from its --json
    document, which ``report show`` calls with the document the report keeps."""
    from ckptaudit.cli.backbone_cmd import render_backbone
    from ckptaudit.cli.born_gap_cmd import render_born_gap
    from ckptaudit.cli.classify_embeddings_cmd import render_embeddings
    from ckptaudit.cli.cross_seed_cmd import render_cross_seed
    from ckptaudit.cli.extrapolate_cmd import render_extrapolate
    from ckptaudit.cli.finetune_probe_cmd import render_finetune
    from ckptaudit.cli.fisher_cmd import render_fisher
    from ckptaudit.cli.gate_cmd import render_gate
    from ckptaudit.cli.gxs_cmd import render_slack, render_transplant, render_velocity
    from ckptaudit.cli.inspect_cmd import render_inspect
    from ckptaudit.cli.regimes_cmd import render_regimes
    from ckptaudit.cli.resume_probe_cmd import render_resume

    def plain(view: Any) -> Any:
        return lambda output, s, label: view(output, s)

    return {
        "backbone": plain(render_backbone), "fisher": plain(render_fisher), "resume-probe": plain(render_resume),
        "gxs transplant": plain(render_transplant), "gxs velocity": plain(render_velocity),
        "gxs slack": plain(render_slack), "regimes": render_regimes, "extrapolate": render_extrapolate,
        "cross-seed": plain(render_cross_seed), "gate": plain(render_gate), "born-gap": render_born_gap,
        "finetune-probe": render_finetune, "inspect": plain(render_inspect), "classify-embeddings": render_embeddings,
    }  # fmt: skip


def _stored_summary(raw: Any, path: Path) -> dict | None:
    """The --json document a report keeps (None for reports written before it was kept)."""
    if raw is None:
        return None
    from ckptaudit.errors import CorruptFileError
    from ckptaudit.io.jsonio import loads_bounded

    text = raw.item() if isinstance(raw, np.ndarray) else raw
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    doc = loads_bounded(text, f"{path}: /summary_json", error=CorruptFileError, hint="write the report again")
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{path}: /summary_json is not a JSON object", "write the report again")
    return doc


def _run_label(paths: Any) -> str:
    """What a report's inputs were given as: the one checkpoint or model, or the run folder holding several."""
    import os

    if not isinstance(paths, np.ndarray) or not len(paths):
        return "report"
    if len(paths) == 1:
        return str(paths[0])
    return os.path.commonpath([str(Path(str(p)).parent) for p in paths]) or "report"


def _argv(raw: Any) -> str:
    """The command line stored in a report: a JSON list of arguments, shown as is when it is anything else."""
    try:
        argv = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return str(raw)
    if isinstance(argv, list):
        return " ".join(map(str, argv))
    return str(raw)


def _render_group(output: Any, name: str, g: dict, brief: bool) -> None:
    rows = []
    for k, v in g.get("@attrs", {}).items():
        if k in ("is_list",):
            continue
        rows.append([escape(k), "attribute", _short(v, brief)])
    for k, v in g.items():
        if k == "@attrs" or isinstance(v, dict):
            continue
        kind = f"{v.dtype} {list(v.shape)}" if isinstance(v, np.ndarray) else "link"
        rows.append([escape(k), escape(kind), _short(v, brief)])
    if rows:
        output.table(escape(f"/{name}"), ["name", "kind", "value"], rows)
    for k, v in g.items():
        if k != "@attrs" and isinstance(v, dict):
            _render_group(output, f"{name}/{k}", v, brief)


def _short(v: Any, brief: bool) -> str:
    from rich.markup import escape

    return escape(_plain(v, brief))


def _plain(v: Any, brief: bool) -> str:
    if isinstance(v, np.ndarray):
        flat = v.ravel()
        limit = 6 if brief else 12
        items = [_fmt(x) for x in flat[:limit]]
        more = f" … ({flat.size} values)" if flat.size > limit else ""
        return "[" + ", ".join(items) + "]" + more
    return _fmt(v)


def _fmt(x: Any) -> str:
    from ckptaudit.report.console import fmt

    if isinstance(x, (bytes,)):
        return x.decode("utf-8", errors="replace")
    return fmt(x)
