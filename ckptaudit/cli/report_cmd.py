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
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Render a saved report: its provenance (command, argv, inputs) and every group of results.

    Example: ckptaudit backbone runs/seed42/ --out backbone.h5 && ckptaudit report show backbone.h5
    """
    from rich.markup import escape

    from ckptaudit.report.hdf5 import read_report

    output = LocalSession("report show", None, json_out, quiet).output
    tree = read_report(path)
    output.json(_jsonable(tree))
    if not output.human:
        return
    attrs = tree["@attrs"]
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
    for key, val in tree.items():
        if key in ("@attrs", "inputs"):
            continue
        _render_group(output, key, val, brief)


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


def _jsonable(tree: dict) -> dict:
    from ckptaudit.report.console import to_jsonable

    return to_jsonable(tree)
