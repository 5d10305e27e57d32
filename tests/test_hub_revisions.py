"""A hub repo whose checkpoints are revisions (step0, step10, ...) read from the local cache as one run through
huggingface_hub's cache API; byte-identical revisions are listed, not counted as two steps; nothing downloads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, invoke

from ckptaudit.io.discover import discover_run

REPO = "tiny-org/tiny-steps"


def _hub_cache(tmp_path: Path, tiny_run: Path) -> Path:
    """The cache layout huggingface_hub writes (blobs named by content hash, snapshots/<commit>/<file> links to
    ../../blobs/<hash>, refs/<revision> = commit), holding the tiny run's checkpoints as revisions step0..step60,
    and step70 whose weights are the very blob of step60 (a duplicate, as public suites have shipped)."""
    repo = tmp_path / "hub" / ("models--" + REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()

    def add(ref: str, files: dict[str, Path]) -> None:
        commit = hashlib.sha1(ref.encode()).hexdigest()
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for name, src in files.items():
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():
                blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, snap), snap / name)
        (repo / "refs" / ref).write_text(commit)

    for step in range(0, 70, 10):
        ck = tiny_run / f"checkpoint-{step}"
        add(f"step{step}", {n: ck / n for n in ("config.json", "model.safetensors", "ckptaudit_task.json")})
    ck = tiny_run / "checkpoint-60"
    add("step70", {n: ck / n for n in ("config.json", "model.safetensors", "ckptaudit_task.json")})
    add("main", {"config.json": ck / "config.json", "model.safetensors": ck / "model.safetensors"})
    return tmp_path / "hub"


@pytest.fixture()
def cache(tmp_path, tiny_run, monkeypatch):
    hub = _hub_cache(tmp_path, tiny_run)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    return hub


def test_revisions_are_a_run_and_duplicates_are_listed(cache):
    run = discover_run(REPO, revisions="step*")
    assert run.steps == [0, 10, 20, 30, 40, 50, 60]
    assert [(p, "byte-identical" in why and f"{REPO}@step60" in why) for p, why in run.left_out] == [(f"{REPO}@step70", True)]
    assert run.by_step(30).config()["model_type"] == "gpt2"


def test_backbone_over_revisions_equals_the_run_directory(cache, tiny_run):
    r = invoke("backbone", REPO, "--revisions", "step*", "--json", "--no-report", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "step70" in r.stderr and "byte-identical" in r.stderr  # said, one line
    via_hub = json.loads(r.stdout)
    r = invoke("backbone", tiny_run, "--json", "--no-report", "--device", "cpu")
    direct = json.loads(r.stdout)
    assert via_hub["steps"] == direct["steps"] == [10, 20, 30, 40, 50, 60]
    np.testing.assert_allclose(via_hub["trunk"]["rho"], direct["trunk"]["rho"], rtol=0, atol=1e-15)


def test_inspect_lists_what_was_left_out(cache):
    r = invoke("inspect", REPO, "--revisions", "step*", "--json", "--no-report", "--no-hash", "--no-file-check")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [c["step"] for c in doc["checkpoints"]] == [0, 10, 20, 30, 40, 50, 60]
    assert doc["left_out"][0]["path"] == f"{REPO}@step70"
    r = invoke("inspect", REPO, "--revisions", "step*", "--steps", "20:40", "--json", "--no-report", "--no-hash")
    assert [c["step"] for c in json.loads(r.stdout)["checkpoints"]] == [20, 30, 40]


def test_uncached_repo_and_unmatched_glob_name_hf_download(cache):
    r = invoke("backbone", "other-org/not-cached", "--revisions", "step*", "--no-report")
    assert_one_line_error(r, "other-org/not-cached", "not in the local hub cache", "hf download other-org/not-cached")
    r = invoke("inspect", REPO, "--revisions", "ckpt-*", "--no-report")
    assert_one_line_error(r, "no cached revision matches 'ckpt-*'", "step0", "hf download")


def test_model_running_commands_take_revisions(cache, tiny_run):
    r = invoke("extrapolate", REPO, "--revisions", "step*", "--predictor", "linear", "--K", 10, "--json",
               "--no-report", "--device", "cpu")
    assert r.exit_code == 0, r.output
    via_hub = json.loads(r.stdout)["results"]
    r = invoke("extrapolate", tiny_run, "--predictor", "linear", "--K", 10, "--json", "--no-report", "--device", "cpu")
    direct = json.loads(r.stdout)["results"]
    assert [(x["step"], x["loss_pred"]) for x in via_hub] == [(x["step"], x["loss_pred"]) for x in direct]
    r = invoke("regimes", REPO, "--revisions", "step*", "--json", "--no-report", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == [0, 10, 20, 30, 40, 50, 60]
