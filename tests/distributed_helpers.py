"""Shared by the torchrun tests: run the CLI in one process or under torchrun, compare two JSON documents."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


def clean_env() -> dict[str, str]:
    """The environment without any torchrun variables, one thread per process on both sides, the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID", "GROUP_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun gives each rank: the same thread count on both sides
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(cwd: Path, args: list[str], nproc: int, timeout: int = 180) -> subprocess.CompletedProcess:
    """`python -m ckptaudit ARGS` in a fresh directory ``cwd``, or the same under torchrun with ``nproc`` ranks."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "ckptaudit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "ckptaudit", *args]
    cwd.mkdir()
    p = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def compare_numbers(a, b, path: str = "") -> int:
    """Every number of a equals b to 1e-10 relative (everything else exactly); returns how many were compared."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        return sum(compare_numbers(a[k], b[k], f"{path}/{k}") for k in a)
    if isinstance(a, list):
        assert len(a) == len(b), path
        return sum(compare_numbers(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert b == pytest.approx(a, rel=1e-10, abs=0.0), path
        return 1
    assert a == b, path
    return 1 if isinstance(a, int) and not isinstance(a, bool) else 0
