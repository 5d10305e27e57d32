"""Pieces every command shares: the session (torchrun, device, output sink, report options), run discovery, and
writing the report."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptaudit.report.console import Output, ProgressHook
from ckptaudit.report.hdf5 import input_records, write_report

if TYPE_CHECKING:
    from ckptaudit.io.discover import Run


def make_output(json_mode: bool, quiet: bool) -> Output:
    return Output(json_mode=json_mode, quiet=quiet)


_CURRENT_OUTPUT: list[Output] = []  # the running command's output sink, for the notes of load_run


def load_run(path: Path, steps: str | None = None, revisions: str | None = None) -> Run:
    """Discover a run (a directory of checkpoints, one checkpoint directory, or one file; with ``revisions``, the
    cached hub revisions of repo id ``path`` matching that glob). What was found but left out of the trajectory
    (model files without a step, byte-identical revisions) is noted, one line each, with the reason."""
    from ckptaudit.io.discover import discover_run

    run = discover_run(path, steps=steps, revisions=revisions)
    if _CURRENT_OUTPUT and run.left_out:
        for where, why in run.left_out:
            _CURRENT_OUTPUT[-1].note(f"left out: {where}: {why}")
    return run


def discover_run_quiet(path: Path, steps: str | None, revisions: str | None) -> Run:
    """``discover_run`` without the left-out notes (for a second look at a run already loaded)."""
    from ckptaudit.io.discover import discover_run

    return discover_run(path, steps=steps, revisions=revisions)


def load_drift_run(path: Path, steps: str | None, anchor_step: int | None, revisions: str | None = None) -> Run:
    """The run for a drift analysis (backbone, gxs velocity): the checkpoints ``--steps`` selects, with the anchor
    taken from the whole run (its first checkpoint, or ``--anchor``) even when ``--steps`` leaves it out, so that a
    step subset keeps rows theta(t) - theta(anchor) of the same run. The anchor step is checked here."""
    from ckptaudit.io.discover import Run
    from ckptaudit.io.steps import anchor_index

    whole = load_run(path, revisions=revisions)
    if steps is None:
        return whole
    anchor = whole.checkpoints[anchor_index(whole.steps, anchor_step)]
    chosen = {c.step: c for c in discover_run_quiet(path, steps, revisions).checkpoints}
    chosen[anchor.step] = anchor
    return Run(whole.path, tuple(chosen[s] for s in sorted(chosen)))


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
    summary: dict | None = None,
) -> Path | None:
    """Write the HDF5 report for one command run (atomic) when ``--out`` asks for one, and tell the user where
    it went after the results."""
    if no_report or out is None:
        return None
    from ckptaudit.cli.capture import current_notes

    path = Path(out)
    records = input_records(checkpoints, hash_files=hash_files)
    write_report(path, command=command, argv=sys.argv, tree=tree, inputs=records, device=device, group=group,
                 notes=current_notes(), summary=summary)
    output.at_end(f"report written to [bold]{path}[/bold]")
    return path


def finish_output() -> None:
    """Print what the running command left for the end (where its report went), after its results."""
    if _CURRENT_OUTPUT:
        _CURRENT_OUTPUT[-1].flush_end()


def load_model_input(model: str, device: str) -> tuple[Any, Any, Any]:
    """(checkpoint, tokenizer, model) of MODEL: a local directory or weight file, or a hub id already cached.

    The tokenizer comes from beside the model, or from a GGUF file's own metadata. Local files only.
    """
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model, load_tokenizer, resolve_model_path

    path = Path(resolve_model_path(model))
    ckpt = discover_run(path).checkpoints[-1]
    tokenizer = load_tokenizer(ckpt.path if ckpt.layout == "gguf" else path)  # a GGUF carries its tokenizer inside
    return ckpt, tokenizer, load_model(ckpt, device=device)


class Progress:
    """Context manager yielding a ProgressHook bound to the output's progress bar."""

    def __init__(self, output: Output, description: str, total: int | None, unit: str = ""):
        self._cm = output.progress(description, total, unit)

    def __enter__(self) -> ProgressHook:
        return ProgressHook(self._cm.__enter__())

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


class _Setup:
    """What every computing command shares once its options are parsed: the command name, the process group
    (``ctx``, None for one process), the device, whether this process prints and writes (``main``), the output
    sink, and the report options (``--out``, ``--no-report``, ``--no-hash``) that :meth:`save_report` applies."""

    command: str
    ctx: Any
    device: str
    main: bool
    output: Output

    def _report_options(self, out: Path | None, no_report: bool, no_hash: bool) -> None:
        self.out, self.no_report, self.hash_files = out, no_report, not no_hash

    def save_report(self, tree: dict, checkpoints: Sequence[Any], group: str | None = None,
                    summary: dict | None = None) -> Path | None:
        """Write this command's HDF5 report (only on the main process), honouring --out, --no-report and --no-hash."""
        if not self.main:
            return None
        return save_report(self.output, self.command, tree, checkpoints, self.out, self.no_report,
                           hash_files=self.hash_files, device=self.device, group=group, summary=summary)

    def finish(self, tree: dict, checkpoints: Sequence[Any], summary: dict,
               render: Callable[[Output, dict], None] | None = None, group: str | None = None,
               figures: Callable[[dict], None] | None = None) -> dict:
        """The tail every computing command shares: the HDF5 report of ``tree`` (with --out), the ``summary`` as the
        --json document, ``figures(summary)`` (the --plot files when asked for, and any note the view should
        follow), then ``render(output, summary)`` for the human view. Returns ``summary``."""
        self.save_report(tree, checkpoints, group=group, summary=summary)
        self.output.json(summary)
        if figures is not None:
            figures(summary)
        if render is not None and self.output.human:
            render(self.output, summary)
        return summary

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def refuse_under_torchrun(command: str) -> None:
    """UsageError when WORLD_SIZE > 1 (a torchrun launch) for a command that runs in one process only: every rank
    would otherwise repeat the whole work and write the same report."""
    from ckptaudit.analyses.distributed import world_size_from_env
    from ckptaudit.errors import UsageError

    n = world_size_from_env()
    if n > 1:
        raise UsageError(
            f"`ckptaudit {command}` runs in a single process, but WORLD_SIZE={n} (torchrun): every rank would repeat "
            "the whole work",
            "launch it without torchrun (only backbone and fisher split their work across processes)",
        )


class Session(_Setup):
    """The setup of a command that may run under torchrun (backbone, fisher): the process group (``ctx``, None for
    one process), the device, whether this is the rank that prints and writes (``main``), and the output sink
    (silent elsewhere)."""

    def __init__(self, command: str, device: str, json_mode: bool, quiet: bool, *, out: Path | None = None,
                 no_report: bool = False, no_hash: bool = False):
        from ckptaudit.analyses import distributed
        from ckptaudit.cli.options import resolve_device

        self.command = command
        self._report_options(out, no_report, no_hash)
        dev = resolve_device(device)
        # Under torchrun (WORLD_SIZE > 1): one process group for the command; rank 0 alone prints and writes.
        self.ctx = distributed.init_from_env(dev)
        self.device = self.ctx.device if self.ctx is not None else dev
        self.main = self.ctx is None or self.ctx.is_main
        self.output = make_output(json_mode, quiet or not self.main)
        _CURRENT_OUTPUT[:] = [self.output]

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.close()


class LocalSession(_Setup):
    """The setup of a command that runs in one process: refuses a torchrun launch (WORLD_SIZE > 1) with one line,
    resolves --device (``None`` for commands without one: the CPU), and picks the output sink."""

    def __init__(self, command: str, device: str | None, json_mode: bool, quiet: bool, *, out: Path | None = None,
                 no_report: bool = False, no_hash: bool = False):
        from ckptaudit.cli.options import resolve_device

        refuse_under_torchrun(command)
        self.command = command
        self._report_options(out, no_report, no_hash)
        self.ctx = None
        self.device = resolve_device(device) if device is not None else "cpu"
        self.main = True
        self.output = make_output(json_mode, quiet)
        _CURRENT_OUTPUT[:] = [self.output]


def render_facts(output: Output, record: dict) -> None:
    """The lines every model-running command prints under its tables: which windows were evaluated (and the cap),
    the precision, and the wall time per phase (``record``: a summary or its settings)."""
    for split, label in (("validation", "evaluation"), ("train", "training")):
        sel = (record.get("eval_data" if split == "validation" else "train_data") or {}).get(split)
        if not sel or (split == "train" and not sel.get("capped")):
            continue
        capped = f", capped at {sel['token_cap']:,} tokens (seeded selection)" if sel["capped"] else ""
        output.print(f"{label}: {sel['windows_used']} of {sel['windows_in_split']} {split} windows, "
                     f"{sel['tokens_used']:,} tokens{capped}")
    prec = record.get("precision")
    if prec:
        output.print(f"precision: {prec['dtype']} ({prec['source']}; checkpoint {prec['checkpoint_dtype'] or 'unknown'})")
    timing = record.get("timing_seconds") or {}
    if timing:
        output.print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items() if v is not None))
