"""Documentation coverage: man pages are fresh, every command and option has help, the README names every command."""

from __future__ import annotations

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
