"""The wheel, installed away from the checkout, holds what the commands read: architecture files, the default
probe texts, the bundled contexts; the CI snippets install ckptaudit from its repository, never by a bare name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_built_wheel_runs_the_commands_outside_the_checkout(tmp_path, tiny_run):
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(dist), str(ROOT)], check=True, capture_output=True)
    (wheel,) = dist.glob("ckptaudit-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)

    where = run("-c", "import ckptaudit; print(ckptaudit.__file__)")
    assert where.stdout.strip().startswith(str(site)), where  # the wheel's copy, not the checkout
    families = json.loads(run("-m", "ckptaudit", "architectures", "--json").stdout)["families"]
    assert {f["name"] for f in families} >= {"gpt2", "llama", "mixtral", "phi3"}
    assert all(f["file"].startswith(str(site)) for f in families)
    contexts = run("-c", "from ckptaudit.analyses.born_gap import load_contexts; print(len(load_contexts('near-synonyms')))")
    assert contexts.stdout.strip() == "10", contexts.stderr
    probes = run("-c", "from ckptaudit.analyses.regimes.run import DEFAULT_PROBES; print(DEFAULT_PROBES)")
    assert probes.stdout.strip().startswith(str(site)) and Path(probes.stdout.strip()).is_file()
    regimes = run("-m", "ckptaudit", "regimes", str(tiny_run), "--no-report", "--json", "--no-loss")
    assert regimes.returncode == 0, regimes.stderr
    assert len(json.loads(regimes.stdout)["steps"]) == 7


def test_ci_snippets_install_ckptaudit_from_its_repository():
    """No registry serves ckptaudit: every snippet installs it from a source the user names."""
    for path in (ROOT / "README.md", ROOT / "docs" / "ci" / "github-actions.yml", ROOT / "docs" / "ci" / "gitlab-ci.yml"):
        text = path.read_text()
        bare = re.findall(r"pip install (?:-\S+ )*ckptaudit(?:\s|$)", text)
        assert not bare, (path, bare)
    for path in (ROOT / "docs" / "ci" / "github-actions.yml", ROOT / "docs" / "ci" / "gitlab-ci.yml"):
        assert '"ckptaudit @ $CKPTAUDIT_SOURCE"' in path.read_text()
