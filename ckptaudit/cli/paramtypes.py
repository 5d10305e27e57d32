"""Numbers on the command line: every integer option fits int64, every float option is finite, ASCII digits only.

Typer converts integer and float options with Python's ``int()`` / ``float()``, which accept any size of integer
(``--seed 99999999999999999999`` overflows later, in torch), ``nan`` and ``inf``, and Unicode digits (``int("٣")``
is 3). :func:`harden` puts a check in front of the conversion of every int/float parameter of a command (its own
range checks still apply afterwards); a bad value is a UsageError, printed as one line like every other.

Also the one place that knows where the click machinery lives: typer >= 0.20 vendors its own copy of click
(``typer._click``), older versions use the click package. ``click_api`` is whichever the installed typer uses.
"""

from __future__ import annotations

import math
from typing import Any

from ckptaudit.io.numbers import parse_float, parse_int

try:  # typer >= 0.20 ships its own click
    from typer import _click as click_api  # type: ignore[attr-defined]
    from typer.exceptions import Abort, Exit  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older typer on the click package
    import click as click_api  # type: ignore[no-redef]
    from click.exceptions import Abort, Exit  # type: ignore[no-redef]

__all__ = ["harden", "metavar_of", "click_api", "Abort", "Exit"]


def _kind(p: Any) -> str | None:
    """'int', 'float' or None for a command parameter, from typer's annotation or click's type."""
    ann = getattr(getattr(p, "type_descriptor", None), "annotation", None)
    if ann is int or ann is float:
        return ann.__name__
    t = getattr(p, "type", None)
    name = type(t).__name__ if t is not None else ""
    if name in ("IntParamType", "IntRange"):
        return "int"
    if name in ("FloatParamType", "FloatRange"):
        return "float"
    return None


def _check(value: Any, kind: str, what: str) -> Any:
    """``value`` (as typed, or a default) checked: ASCII digits, int64 for ints, finite for floats."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_check(v, kind, what) for v in value)
    if kind == "int":
        return parse_int(str(value), what)
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            from ckptaudit.errors import UsageError

            raise UsageError(f"{what}: {value} is not a finite number")
        return value
    return parse_float(str(value), what)


def harden(command: Any) -> Any:
    """Check the raw value of every int/float parameter of ``command`` before typer/click converts it, and give
    every parameter a readable help metavar (:func:`metavar_of`); once per command."""
    if getattr(command, "_ckptaudit_hardened", False):
        return command
    for p in getattr(command, "params", ()):
        kind = _kind(p)
        if kind is None:
            _tidy_help(p)
            continue
        what = (p.opts[0] if getattr(p, "opts", None) else p.name) or "value"
        original = p.process_value

        def process_value(ctx: Any, value: Any, _orig: Any = original, _kind: str = kind, _what: str = what) -> Any:
            return _orig(ctx, _check(value, _kind, _what))

        p.process_value = process_value
        _tidy_help(p)
    get_help_option = command.get_help_option

    def tidy_help_option(ctx: Any) -> Any:
        option = get_help_option(ctx)
        if option is not None:
            _tidy_help(option)
        return option

    command.get_help_option = tidy_help_option
    command._ckptaudit_hardened = True
    return command


def metavar_of(p: Any) -> str | None:
    """What ``--help`` shows after an option or for an argument: the declared metavar; nothing for a flag;
    the choices ``a|b``; ``N`` for an integer, ``X`` for a real number, ``PATH`` for a path; otherwise the
    parameter's name in capitals (``--lr-mult LR_MULT``, ``RUN_DIR``)."""
    if getattr(p, "metavar", None):
        return p.metavar
    if getattr(p, "is_flag", False) and not getattr(p, "count", False):
        return None
    desc = getattr(p, "type_descriptor", None)
    choices = getattr(desc, "choices", None) if getattr(desc, "is_choice", False) else getattr(getattr(p, "type", None), "choices", None)
    if choices:
        return "|".join(str(getattr(c, "value", c)) for c in choices)
    if not _is_argument(p):
        kind = _kind(p)
        if kind == "int":
            return "N"
        if kind == "float":
            return "X"
        if getattr(desc, "is_path", False) or getattr(getattr(p, "type", None), "name", "") == "path":
            return "PATH"
    return (p.name or "value").upper()


def _is_argument(p: Any) -> bool:
    return type(p).__name__.endswith("Argument")


def _tidy_help(p: Any) -> None:
    """Replace typer's ``<str>`` / ``<bool>`` type column and ``{name}`` usage names by :func:`metavar_of`."""
    shown = metavar_of(p)
    if _is_argument(p):
        name = shown or (p.name or "value").upper()
        multiple = getattr(p, "nargs", 1) != 1
        p._usage_display_name = lambda: (name if p.required else f"[{name}]") + ("..." if multiple else "")
        p._rich_display_name = lambda: name + ("..." if multiple else "")
        p.display_type_rich = lambda ctx: None
    else:
        p.display_type_rich = lambda ctx: shown
