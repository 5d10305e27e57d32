"""Root Typer app: global flags, command registration, and the error -> exit-code mapping.

Exit codes: 0 success, 1 a gate check failed, 2 bad input or usage. A user error prints one line on stderr
(no traceback unless --debug or CKPTAUDIT_DEBUG=1).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from ckptaudit import __version__
from ckptaudit.errors import CkptAuditError


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """--debug on the command line (root context) or CKPTAUDIT_DEBUG=1 in the environment."""
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get("CKPTAUDIT_DEBUG", "") not in ("", "0", "false")


class AuditGroup(TyperGroup):
    """A command group that turns CkptAuditError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CkptAuditError as e:
            if debug_enabled(ctx):
                raise
            click.echo(f"ckptaudit: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("ckptaudit: interrupted", err=True)
            ctx.exit(130)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # registration order, not alphabetical: the README order


app = typer.Typer(
    cls=AuditGroup,
    name="ckptaudit",
    help="Audit neural-network training checkpoints: trajectory and optimizer-state analyses, HDF5 reports, CI gates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckptaudit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors (also CKPTAUDIT_DEBUG=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Audit neural-network training checkpoints: trajectory and optimizer-state analyses, HDF5 reports, CI gates."""
    # --debug is read back from the root context by AuditGroup.invoke; nothing global is changed.


def _register() -> None:
    # Imported here so that every command module can import `app` helpers without cycles.
    from ckptaudit.cli import commands  # noqa: F401


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except CkptAuditError as e:  # raised outside a command (e.g. while parsing)
        if debug_enabled():
            raise
        print(f"ckptaudit: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
