"""`ckptaudit gate PATH --policy policy.toml`: run a policy's checks for CI; exit 0 pass, 1 fail, 2 bad input."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession, Progress, load_run, refuse_under_torchrun
from ckptaudit.cli.options import (
    DeviceOpt,
    JsonOpt,
    NoHashOpt,
    NoReportOpt,
    OutOpt,
    QuietOpt,
    SeedOpt,
    StepsOpt,
)
from ckptaudit.errors import GateFailedError, UsageError

_STATUS = {"pass": "[green]pass[/green]", "fail": "[bold red]FAIL[/bold red]", "skipped": "[yellow]skipped[/yellow]"}


@app.command()
def gate(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A run directory, a checkpoint directory or a checkpoint file to gate. With --init: the policy file "
            "to write (stdout when omitted).",
            show_default=False,
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option("--policy", "-p", help="Policy TOML naming the checks and their thresholds (see docs/gate.md).")
    ] = None,
    init: Annotated[
        bool, typer.Option("--init", help="Write a commented default policy to PATH (or stdout) and exit.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="With --init: overwrite an existing policy file.")] = False,
    json_out: JsonOpt = False,
    json_path: Annotated[
        Path | None,
        typer.Option("--json-out", metavar="PATH", help="Write the results as JSON to PATH (the document --json prints), "
                     "next to the JUnit and SARIF files."),
    ] = None,
    junit: Annotated[
        Path | None, typer.Option("--junit", metavar="PATH", help="Write JUnit XML to PATH: one testcase per check.")
    ] = None,
    sarif: Annotated[
        Path | None,
        typer.Option("--sarif", metavar="PATH", help="Write SARIF 2.1.0 to PATH: one result per failed check, located at its file."),
    ] = None,
    steps: StepsOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    no_report: NoReportOpt = False,
    no_hash: NoHashOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Gate a checkpoint or run in CI: run the checks a policy enables (--init writes a policy that lists every
    check with its keys) and exit 0 when all pass, 1 when any fails, 2 on bad input or a bad policy. A check that
    cannot run is reported as skipped, never as passed.

    Example: ckptaudit gate checkpoints/ --policy ckptaudit-policy.toml --junit gate.xml --json-out gate.json
    """
    from ckptaudit.gate import load_policy, parse_policy, run_gate
    from ckptaudit.gate.outputs import gate_json, write_json, write_junit, write_sarif
    from ckptaudit.gate.policy import default_policy_text

    if init:
        refuse_under_torchrun("gate --init")  # every rank would write the same file
        text = default_policy_text()
        parse_policy(text, "<default policy>")  # the template must stay valid: fail loudly here, not in CI
        _write_init(path, text, force)
        return
    if path is None:
        raise UsageError("missing PATH: the run directory or checkpoint to gate", "ckptaudit gate PATH --policy FILE")
    if policy is None:
        raise UsageError("--policy is required", "write one with `ckptaudit gate --init ckptaudit-policy.toml`")
    if json_path is not None and str(json_path) == "-":  # the document on stdout is what --json prints
        json_out, json_path = True, None
    _check_outputs(json_path, junit, sarif, None if no_report else out)  # before any work, like --out
    pol = load_policy(policy)  # before touching the run: a bad policy is exit 2 whatever the input
    session = LocalSession("gate", device, json_out, quiet, out=out, no_report=no_report, no_hash=no_hash)
    output, dev = session.output, session.device
    run = load_run(path, steps)
    with Progress(output, "gating", len(pol.checks), "checks") as hook:
        result = run_gate(run, pol, device=dev, seed=seed, progress=hook)

    targets = run.checkpoints if pol.target == "all" else run.checkpoints[-1:]
    session.finish(result.to_hdf5_tree(), targets, gate_json(result), render_gate)
    if json_path is not None:
        write_json(result, json_path)
    if junit is not None:
        write_junit(result, junit)
    if sarif is not None:
        write_sarif(result, sarif)
    if not result.passed:
        # Raised only after every output is written: CI needs the reports most when the gate fails.
        raise GateFailedError(result.summary())


def _check_outputs(json_path: Path | None, junit: Path | None, sarif: Path | None, out: Path | None) -> None:
    """Every output path writable, and no two the same file (one would overwrite the other)."""
    from ckptaudit.cli.options import check_output_path

    named = [("--json-out", json_path), ("--junit", junit),
             ("--sarif", sarif), ("--out", out)]
    seen: dict[Path, str] = {}
    for option, p in named:
        if p is None:
            continue
        check_output_path(p, option)
        key = p.resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {option} both name {p}", "give each output its own file")
        seen[key] = option


def _write_init(path: Path | None, text: str, force: bool) -> None:
    if path is None or str(path) == "-":
        sys.stdout.write(text)
        return
    if path.is_dir():
        raise UsageError(f"{path} is a directory", "give the policy file to write, e.g. ckptaudit-policy.toml")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", "pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    typer.echo(f"policy written to {path}", err=True)


def _cell(value: Any) -> str:
    """A value/threshold summary for the table: dicts as k=v pairs, lists joined, markup escaped."""
    from rich.markup import escape

    if value is None:
        return "—"
    if isinstance(value, dict):
        return escape(", ".join(f"{k}={_cell_plain(v)}" for k, v in value.items()))
    return escape(_cell_plain(value))


def _cell_plain(value: Any) -> str:
    from ckptaudit.report.console import fmt

    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return fmt(value)


def render_gate(output: Any, doc: dict) -> None:
    """Terminal view of the gate's JSON document (:func:`ckptaudit.gate.outputs.gate_json`): one row per check,
    then the verdict."""
    from rich.markup import escape

    rows = [
        [c["name"], _STATUS.get(c["status"], c["status"]), _cell(c["value"]), _cell(c["threshold"]), escape(str(c["message"]))]
        for c in doc["checks"]
    ]
    output.table(f"gate: {escape(str(doc['run']))} (policy {escape(str(doc['policy']))}, target {doc['target']})",
                 ["check", "status", "value", "threshold", "message"], rows)  # fmt: skip
    verdict = "[green]gate passed[/green]" if doc["passed"] else "[red]gate failed[/red]"
    output.print(f"{verdict}: {escape(str(doc['summary']))}")
