"""Documentation coverage: man pages are fresh, every command and option has help, the README names every command."""

from __future__ import annotations

import re
from pathlib import Path

from ckptaudit.cli.manpages import generate, is_argument, is_option, iter_commands, root_command

ROOT = Path(__file__).resolve().parents[1]


def test_man_pages_are_up_to_date():
    pages = generate()
    stale = [n for n, text in pages.items() if not (ROOT / "man" / n).exists() or (ROOT / "man" / n).read_text() != text]
    assert not stale, f"man pages out of date: {stale} — run `make man`"


def test_every_command_and_option_has_help():
    missing = []
    n_options = 0
    for path, cmd in iter_commands(root_command()):
        if not (cmd.help or "").strip():
            missing.append(" ".join(path))
        for p in cmd.params:
            n_options += is_option(p)
            if is_option(p) and not (p.help or "").strip():
                missing.append(f"{' '.join(path)} {p.opts[0]}")
            if is_argument(p) and not (getattr(p, "help", "") or "").strip():
                missing.append(f"{' '.join(path)} {p.name}")
    assert n_options > 50, "the option walk found too few options: the check would pass vacuously"
    assert not missing, f"commands/options without help text: {missing}"


def test_readme_documents_every_command():
    readme = (ROOT / "README.md").read_text()
    undocumented = [" ".join(p) for p, _ in iter_commands(root_command()) if f"ckptaudit {' '.join(p)}" not in readme]
    assert not undocumented, f"README lacks: {undocumented}"
    assert "make test" in readme and "make demo" in readme


def test_help_shows_metavars_not_type_names():
    """`--help` of every command: no typer type labels (<str>, <bool>) and no {braced} argument names; a flag shows
    no value, an integer option N, a path option PATH."""
    from cli_helpers import invoke

    texts = {}
    for path, _ in iter_commands(root_command()):
        texts[path] = invoke(*path, "--help", env={"COLUMNS": "200"}).output
    texts[()] = invoke("--help", env={"COLUMNS": "200"}).output
    for path, text in texts.items():
        assert "Usage:" in text, path
        for label in ("<str>", "<bool>", "<int>", "<float>", "<path>"):
            assert label not in text, f"ckptaudit {' '.join(path)} --help shows {label}"
        assert not re.search(r"\{[a-z_]+\}", text), f"ckptaudit {' '.join(path)} --help shows a braced name"
    rows = {ln.split()[1]: ln.split() for ln in texts[("backbone",)].splitlines() if ln.startswith("│ --")}
    assert rows["--anchor"][2] == "N" and rows["--out"][3] == "PATH"  # --out has the short alias -o before it
    assert rows["--include-bias"][2] == "Include"  # a flag: its help follows the name directly
    assert "Usage: ckptaudit backbone [OPTIONS] RUN_DIR" in texts[("backbone",)]
