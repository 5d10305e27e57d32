"""Several processes: `torchrun --nproc-per-node 2 -m ckptaudit backbone` (gloo, CPU) against one process.

The distributed run must report every number of the single-process run (to 1e-10 relative; by construction the
Grams are bit-identical), write exactly one report and one vectors file, and print one JSON document.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import compare_numbers, run_cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _backbone(cwd: Path, run: Path, nproc: int) -> subprocess.CompletedProcess:
    args = ["backbone", str(run), "--json", "--no-hash", "--device", "cpu", "--out", "report.h5",
            "--save-vectors", "vectors.safetensors", "--switch", "20:40"]
    return run_cli(cwd, args, nproc, timeout=120)


@pytest.mark.slow
def test_two_process_gloo_run_equals_single_process(tiny_run, tmp_path):
    single = _backbone(tmp_path / "single", tiny_run, 1)
    dist = _backbone(tmp_path / "dist", tiny_run, 2)
    ref, got = json.loads(single.stdout), json.loads(dist.stdout)  # one JSON document: rank 1 printed nothing
    assert ref.pop("vectors") == "vectors.safetensors" and got.pop("vectors") == "vectors.safetensors"
    assert compare_numbers(ref, got) > 100
    # exactly one report and one vectors file, both from rank 0
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["report.h5", "vectors.safetensors"]
    from safetensors.numpy import load_file

    v1, v2 = load_file(tmp_path / "single" / "vectors.safetensors"), load_file(tmp_path / "dist" / "vectors.safetensors")
    assert set(v1) == set(v2) and all(np.array_equal(v1[k], v2[k]) for k in v1)
    import h5py

    with h5py.File(tmp_path / "single" / "report.h5") as f1, h5py.File(tmp_path / "dist" / "report.h5") as f2:
        for key in ("trunk/sigma", "trunk/a", "block_1/r_norm", "group_G/velocity"):
            np.testing.assert_allclose(f2[f"backbone/{key}"][()], f1[f"backbone/{key}"][()], rtol=1e-10, atol=0)


def test_context_helpers_single_process(monkeypatch):
    from ckptaudit.analyses import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world_size_from_env() == 1
    assert distributed.init_from_env("cpu") is None  # no process group for one process
    assert distributed.active() is None
    monkeypatch.setenv("WORLD_SIZE", "x")
    assert distributed.world_size_from_env() == 1
