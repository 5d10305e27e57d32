"""Several processes: `torchrun --nproc-per-node 2 -m ckptaudit backbone` (gloo, CPU) against one process.

The distributed run must report every number of the single-process run (to 1e-10 relative; by construction the
Grams are bit-identical), write exactly one report and one vectors file, and print one JSON document.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID", "GROUP_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun gives each rank: the same thread count on both sides
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _backbone(cwd: Path, run: Path, nproc: int) -> subprocess.CompletedProcess:
    args = ["backbone", str(run), "--json", "--no-hash", "--device", "cpu", "--out", "report.h5",
            "--save-vectors", "vectors.safetensors", "--switch", "20:40"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "ckptaudit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "ckptaudit", *args]
    cwd.mkdir()
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _compare(a, b, path="") -> int:
    """Every number of a equals b to 1e-10 relative; returns how many numbers were compared."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        return sum(_compare(a[k], b[k], f"{path}/{k}") for k in a)
    if isinstance(a, list):
        assert len(a) == len(b), path
        return sum(_compare(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert b == pytest.approx(a, rel=1e-10, abs=0.0), path
        return 1
    assert a == b, path
    return 1 if isinstance(a, int) and not isinstance(a, bool) else 0


def test_two_process_gloo_run_equals_single_process(tiny_run, tmp_path):
    single = _backbone(tmp_path / "single", tiny_run, 1)
    dist = _backbone(tmp_path / "dist", tiny_run, 2)
    ref, got = json.loads(single.stdout), json.loads(dist.stdout)  # one JSON document: rank 1 printed nothing
    assert ref.pop("vectors") == "vectors.safetensors" and got.pop("vectors") == "vectors.safetensors"
    assert _compare(ref, got) > 100
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
