"""Pieces every command shares: the output sink, run discovery, and writing the report."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptaudit.report.console import Output, ProgressHook
from ckptaudit.report.hdf5 import default_report_path, input_records, write_report


def make_output(json_mode: bool, quiet: bool) -> Output:
    return Output(json_mode=json_mode, quiet=quiet)


def load_run(path: Path, steps: str | None = None) -> Any:
    """Discover a run (a directory of checkpoints, one checkpoint directory, or one file)."""
    from ckptaudit.io.discover import discover_run

    return discover_run(path, steps=steps)


def save_report(
    output: Output,
    command: str,
    tree: dict,
    checkpoints: Sequence[Any],
    out: Path | None,
    no_report: bool = False,
    hash_files: bool = True,
    device: str = "cpu",
    group: str | None = None,
) -> Path | None:
    """Write the HDF5 report for one command run (atomic) and tell the user where it went."""
    if no_report:
        return None
    path = out if out is not None else default_report_path(command)
    records = input_records(checkpoints, hash_files=hash_files)
    write_report(path, command=command, argv=sys.argv, tree=tree, inputs=records, device=device, group=group)
    output.note(f"report written to [bold]{path}[/bold]")
    return path


class Progress:
    """Context manager yielding a ProgressHook bound to the output's progress bar."""

    def __init__(self, output: Output, description: str, total: int | None):
        self._cm = output.progress(description, total)

    def __enter__(self) -> ProgressHook:
        return ProgressHook(self._cm.__enter__())

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)
