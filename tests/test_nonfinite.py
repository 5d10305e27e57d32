"""A diverged run (NaN / inf in the weights) is one line naming the first non-finite tensor and its step, exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from safetensors.torch import load_file, save_file


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_backbone_names_the_first_non_finite_tensor_and_step(tiny_run: Path, tmp_path: Path, bad: float):
    run = tmp_path / "run"
    for step in (0, 10, 20, 30, 40):
        shutil.copytree(tiny_run / f"checkpoint-{step}", run / f"checkpoint-{step}")
    for step in (30, 40):  # diverged from step 30 on
        f = run / f"checkpoint-{step}" / "model.safetensors"
        sd = load_file(f)
        sd["transformer.h.1.mlp.c_fc.weight"][3, 5] = bad
        save_file(sd, str(f), metadata={"format": "pt"})
    r = invoke("backbone", run, "--no-report", "--device", "cpu")
    assert_one_line_error(r, "checkpoint 30", "transformer.h.1.mlp.c_fc.weight", "NaN or infinite")
    # the checkpoints before the divergence still audit
    ok = invoke("backbone", run, "--steps", "0:20", "--no-report", "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    assert torch.isfinite(load_file(run / "checkpoint-20" / "model.safetensors")["transformer.h.1.mlp.c_fc.weight"]).all()
