"""The package's layers, read from the import statements of its own source (function-level imports included):
io knows files and formats and imports no other layer; the built-in tasks and their data build on io but on no
analysis; analyses, the report writers and the gate never reach the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ckptaudit

ROOT = Path(ckptaudit.__file__).parent
# layer -> the ckptaudit packages and modules it may import (besides itself)
ALLOWED = {
    "io": {"errors"},
    "tasks": {"errors", "io", "sampling"},
    "analyses": {"errors", "io", "tasks", "sampling", "report"},
    "report": {"__version__", "errors"},
    "gate": {"__version__", "errors", "io", "tasks", "sampling", "analyses", "report"},
}


def _imported(path: Path) -> set[str]:
    """The ckptaudit.X names (first component after ckptaudit) that ``path`` imports anywhere in its text."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "ckptaudit":
                names = [f"ckptaudit.{a.name}" for a in node.names]
        found.update(n.split(".")[1] for n in names if n.startswith("ckptaudit.") and n.count(".") >= 1)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_lies_below_it(layer: str) -> None:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    wrong = {f"{p.relative_to(ROOT)} imports ckptaudit.{m}"
             for p in files for m in _imported(p) - ALLOWED[layer] - {layer}}  # fmt: skip
    assert not wrong, sorted(wrong)


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    """A lazy import inside a function counts: the cycle io -> tasks ran through one."""
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from ckptaudit.tasks.train import NO_DECAY\n    import ckptaudit.cli.app\n")
    assert _imported(f) == {"tasks", "cli"}
