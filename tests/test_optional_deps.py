"""What a user without the optional packages meets: the command run in a fresh interpreter where importing the
package fails exactly as it does when it is not installed (a folder first on sys.path whose package raises
``ModuleNotFoundError(name=...)``, the error Python's import system gives for an absent package), so the real import
statements in ckptaudit take their fallback path. Each case also checks that the package is otherwise present, so the
failure seen is the one planted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _absent(root: Path, *packages: str) -> Path:
    """A sys.path folder in which each of ``packages`` is not installed, as far as ``import`` can tell."""
    for name in packages:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    return root


def _run(shadow: Path, *code_or_args: str, module: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}
    argv = [sys.executable, "-m", "ckptaudit", *code_or_args] if module else [sys.executable, "-c", code_or_args[0]]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_the_shadow_folder_makes_the_package_absent(tmp_path):
    shadow = _absent(tmp_path / "site", "matplotlib")
    r = _run(shadow, "import matplotlib")
    assert r.returncode == 1 and "ModuleNotFoundError: No module named 'matplotlib'" in r.stderr
    # ...and only there: the same interpreter without the folder imports it.
    assert subprocess.run([sys.executable, "-c", "import matplotlib"], capture_output=True).returncode == 0


def test_plot_without_matplotlib_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    shadow = _absent(tmp_path / "site", "matplotlib")
    figs = tmp_path / "figs"
    r = _run(shadow, "backbone", str(tiny_run), "--no-report", "--plot", str(figs), "--device", "cpu", module=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.splitlines() == [err] and "Traceback" not in r.stderr
    assert err.startswith("ckptaudit: error:") and "--plot needs matplotlib" in err and "ckptaudit[plot]" in err
    assert not figs.exists() or not any(figs.iterdir())


@pytest.mark.parametrize("absent", ["datasets", "pyarrow"])
def test_dataset_folder_without_datasets_names_the_file_and_the_fix(tmp_path, absent):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    import datasets

    datasets.Dataset.from_dict({"text": ["one document", "another one"]}).save_to_disk(str(folder))
    shadow = _absent(tmp_path / "site", absent)
    code = ("from pathlib import Path\n"
            "from ckptaudit.errors import DataError\n"
            "from ckptaudit.io.data_files import read_documents\n"
            "try:\n"
            f"    read_documents(Path({str(folder)!r}))\n"
            "except DataError as e:\n"
            "    print('DataError', e)\n")
    r = _run(shadow, code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"DataError {folder}: a dataset folder needs the `datasets` package — pip install datasets"
