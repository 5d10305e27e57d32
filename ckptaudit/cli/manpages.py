"""Generate man pages (roff) from the Typer app: `python -m ckptaudit.cli.manpages DIR [--check]`.

One page for the tool (ckptaudit.1) and one per subcommand (ckptaudit-<name>.1). `--check` exits 1 when the
checked-in pages differ from what the app generates (the test suite and `make lint` run it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from typer.main import get_command

from ckptaudit import __version__
from ckptaudit.cli.paramtypes import metavar_of

# typer >= 0.2x ships its own copy of click, so isinstance checks against the `click` package do not match its
# objects; these predicates rely on the attributes both copies share.


def is_group(cmd: object) -> bool:
    return hasattr(cmd, "list_commands") and hasattr(cmd, "get_command")


def is_option(p: object) -> bool:
    return getattr(p, "param_type_name", "") == "option"


def is_argument(p: object) -> bool:
    return getattr(p, "param_type_name", "") == "argument"


def _context(cmd: object):
    from typer._click.core import Context

    return Context(cmd)  # type: ignore[arg-type]


DATE = "2026"


def _esc(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def root_command():
    """The click group behind the Typer app."""
    from ckptaudit.cli.app import app

    return get_command(app)


def iter_commands(group, prefix: tuple[str, ...] = ()):
    """Yield (path, command) for every leaf command, depth first in registration order."""
    ctx = _context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        if is_group(cmd):
            yield from iter_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def _param_synopsis(p) -> str:
    if is_argument(p):
        return (p.name or 'arg').upper()
    opt = p.opts[0]
    if getattr(p, "is_flag", False):
        return f"[{opt}]"
    return f"[{opt} {metavar_of(p)}]"


def _options_section(cmd) -> list[str]:
    out = []
    for p in cmd.params:
        if is_argument(p):
            help_text = getattr(p, "help", None) or ""
            out += [".TP", f"\\fB{_esc((p.name or 'arg').upper())}\\fR", _esc(help_text)]
    for p in cmd.params:
        if is_option(p) and not p.hidden:
            names = ", ".join(p.opts + p.secondary_opts)
            if metavar_of(p):
                names += f" {metavar_of(p)}"
            default = ""
            if not p.is_flag and p.default not in (None, (), []) and not callable(p.default):
                default = f" [default: {p.default}]"
            out += [".TP", f"\\fB{_esc(names)}\\fR", _esc((p.help or "") + default)]
    return out


def page_for(path: tuple[str, ...], cmd) -> str:
    name = "ckptaudit-" + "-".join(path)
    full = "ckptaudit " + " ".join(path)
    helptext = (cmd.help or "").strip()
    summary = helptext.split("\n\n")[0].replace("\n", " ")
    lines = [
        f'.TH "{name.upper()}" "1" "{DATE}" "ckptaudit {__version__}" "ckptaudit manual"',
        ".SH NAME",
        f"{_esc(name)} \\- {_esc(summary)}",
        ".SH SYNOPSIS",
        f"\\fB{_esc(full)}\\fR " + _esc(" ".join(_param_synopsis(p) for p in cmd.params if not getattr(p, "hidden", False))),
        ".SH DESCRIPTION",
    ]
    for para in helptext.split("\n\n"):
        lines += [".PP", _esc(" ".join(para.split()))]
    lines += [".SH OPTIONS"] + _options_section(cmd)
    lines += [
        ".SH EXIT STATUS",
        "0 success; 1 a gate check failed; 2 bad input or usage (one line on stderr naming the file and the fix).",
        ".SH SEE ALSO",
        "\\fBckptaudit\\fR(1)",
    ]
    return "\n".join(lines) + "\n"


def root_page(group) -> str:
    lines = [
        f'.TH "CKPTAUDIT" "1" "{DATE}" "ckptaudit {__version__}" "ckptaudit manual"',
        ".SH NAME",
        "ckptaudit \\- " + _esc((group.help or "").strip().split("\n")[0]),
        ".SH SYNOPSIS",
        "\\fBckptaudit\\fR [\\-\\-debug] [\\-\\-version] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        ".PP",
        _esc(
            "ckptaudit loads checkpoint directories (weights plus optional optimizer state), runs offline analyses of "
            "the training trajectory and the optimizer state, writes HDF5 reports and terminal tables, and gates "
            "released checkpoints in CI."
        ),
        ".SH COMMANDS",
    ]
    for path, cmd in iter_commands(group):
        summary = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [".TP", f"\\fBckptaudit {_esc(' '.join(path))}\\fR", _esc(summary)]
    lines += [".SH GLOBAL OPTIONS"] + _options_section(group)
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBCKPTAUDIT_DEBUG\\fR",
        "Set to 1 to show full tracebacks for errors.",
        ".SH EXIT STATUS",
        "0 success; 1 a gate check failed; 2 bad input or usage.",
        ".SH SEE ALSO",
        ", ".join(f"\\fBckptaudit\\-{_esc('-'.join(p))}\\fR(1)" for p, _ in iter_commands(group)),
    ]
    return "\n".join(lines) + "\n"


def generate() -> dict[str, str]:
    """File name -> page text for the whole app."""
    group = root_command()
    pages = {"ckptaudit.1": root_page(group)}
    for path, cmd in iter_commands(group):
        pages[f"ckptaudit-{'-'.join(path)}.1"] = page_for(path, cmd)
    return pages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--check", action="store_true", help="exit 1 if the pages on disk are stale")
    args = ap.parse_args(argv)
    pages = generate()
    if args.check:
        stale = [n for n, text in pages.items() if not (args.directory / n).exists() or (args.directory / n).read_text() != text]
        extra = [p.name for p in args.directory.glob("*.1") if p.name not in pages]
        if stale or extra:
            print(f"man pages out of date: {', '.join(stale + extra)} — run `make man`", file=sys.stderr)
            return 1
        return 0
    args.directory.mkdir(parents=True, exist_ok=True)
    for p in args.directory.glob("*.1"):
        if p.name not in pages:
            p.unlink()
    for n, text in pages.items():
        (args.directory / n).write_text(text)
    print(f"wrote {len(pages)} man pages to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
