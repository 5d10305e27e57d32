"""Root Typer app: global flags, command registration, and the error -> exit-code mapping.

Exit codes: 0 success, 1 a gate check failed, 2 bad input or usage. A user error prints one line on stderr
(no traceback unless --debug or CKPTAUDIT_DEBUG=1): ckptaudit's own errors, and click's usage errors (an unknown
option, a value out of range) through the same formatter. Warnings of the libraries a command drives are collected
as notes (cli/capture.py): into the report, and on stderr with --verbose.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ckptaudit import __version__
from ckptaudit.cli.paramtypes import Abort, click_api
from ckptaudit.errors import CkptAuditError

click = click_api  # the click that the installed typer runs on (its own copy in typer >= 0.20)


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """--debug on the command line (root context) or CKPTAUDIT_DEBUG=1 in the environment."""
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get("CKPTAUDIT_DEBUG", "") not in ("", "0", "false")


_COMMAND_KEY = "ckptaudit.command"


def command_spelling(command: Any) -> Any:
    """How ``command`` (a click command) spells a parameter an error names (``CkptAuditError.param``, ``$name``):
    its long option (``--window``, then a space before a value), an argument's metavar. A name the command lacks
    is matched up to a plural "s", then by its usual option, any of a parameter's long options (``train_steps`` ->
    ``--train-steps`` of the parameter ``steps``; ``backbone_run`` -> ``--run``, whose alias is ``--backbone-run``),
    else spelled ``errors.option_spelling``."""
    from ckptaudit.errors import matching_name
    from ckptaudit.errors import option_spelling as default

    opts = {}
    aliases = {}  # every long option -> the parameter's first (fisher's --backbone-run -> --run)
    for p in getattr(command, "params", None) or ():
        if p.name is None:
            continue
        longs = [o for o in p.opts if o.startswith("--")]
        opts[p.name] = longs[0] if longs else p.name.upper()
        aliases.update(dict.fromkeys(longs, opts[p.name]))

    def spelling(name: str, with_value: bool) -> str:
        own = matching_name(name, opts)
        if own is not None:
            flag = opts[own]
        else:
            flag = default(name, False)
            alias = matching_name(flag, aliases)
            flag = aliases[alias] if alias is not None else flag
        return flag + " " if with_value else flag

    return spelling


def one_line(text: str) -> str:
    """``text`` on one line: what an error line may hold whatever the message it wraps."""
    return " ".join(str(text).split())


def usage_error_line(e: click.ClickException) -> str:
    """The one stderr line for one of click's usage errors: the message, then where the options are listed."""
    line = f"ckptaudit: error: {one_line(e.format_message())}"
    ctx = getattr(e, "ctx", None)
    return line + f" — see `{ctx.command_path if ctx is not None else 'ckptaudit COMMAND'} --help`"


class AuditGroup(TyperGroup):
    """A command group that turns CkptAuditError into one line on stderr and its exit code, checks every number
    option (paramtypes.harden), and collects library warnings while the command runs."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        from ckptaudit.cli.paramtypes import harden

        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            ctx.meta[_COMMAND_KEY] = cmd  # meta is shared by the whole context chain: the leaf command wins
        return name, (harden(cmd) if cmd is not None else cmd), rest

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.parent is not None:  # a subgroup (report, gxs): the root already captures and maps errors
            return super().invoke(ctx)
        from ckptaudit.cli.capture import capture_library_warnings

        notes: list[str] = []
        try:
            with capture_library_warnings() as collected:
                try:
                    rv = super().invoke(ctx)
                finally:
                    notes = collected.notes
        except CkptAuditError as e:
            if debug_enabled(ctx):
                e.show_traceback = True  # for main(), which no longer sees the root context's --debug
                raise
            _show_notes(ctx, notes)
            click.echo(f"ckptaudit: error: {one_line(e.render(command_spelling(ctx.meta.get(_COMMAND_KEY))))}",
                       err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("ckptaudit: interrupted", err=True)
            ctx.exit(130)
        _show_notes(ctx, notes)
        from ckptaudit.cli.common import finish_output

        finish_output()
        return rv

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        from ckptaudit.cli.paramtypes import harden

        harden(self)  # the root's own options (--debug, --version) read like every command's
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # `ckptaudit` alone: the help, as before
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            if debug_enabled():
                raise
            click.echo(usage_error_line(e), err=True)
            sys.exit(2 if isinstance(e, click.exceptions.UsageError) else e.exit_code)
        except Abort:
            click.echo("ckptaudit: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

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
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the warnings of the libraries a command drives (kept as report notes).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Audit neural-network training checkpoints: trajectory and optimizer-state analyses, HDF5 reports, CI gates."""
    # --debug and --verbose are read back from the root context by AuditGroup.invoke; nothing global is changed.


def _show_notes(ctx: click.Context, notes: list[str]) -> None:
    """With --verbose: the captured library warnings, one ``ckptaudit: note:`` line each, on stderr."""
    if ctx.find_root().params.get("verbose"):
        for note in notes:
            click.echo(f"ckptaudit: note: {note}", err=True)


def _register() -> None:
    # Imported here so that every command module can import `app` helpers without cycles.
    from ckptaudit.cli import commands  # noqa: F401


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except CkptAuditError as e:  # raised outside a command (e.g. while parsing), or passed on under --debug
        if debug_enabled() or getattr(e, "show_traceback", False):
            raise
        print(f"ckptaudit: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
