"""DeepSpeed engine checkpoints written by DeepSpeed itself on CPU (DS_ACCELERATOR=cpu, gloo; fixtures/stacks.py):
ZeRO 0 and 1 in one process, ZeRO 2 and 3 over two data-parallel ranks, and the Trainer layout with the engine's
global_stepN/ inside checkpoint-N/. ckptaudit reads them without DeepSpeed (it is not even importable here): the
LossScaler in the optim-states pickle goes through io/plainpickle's stand-ins.

References: the live model's parameter count, and the same training run in one process with torch's AdamW
(reference.json): DeepSpeed's fp32 ZeRO arithmetic is AdamW's on flat tensors, so moments and weights agree
to float rounding. The file-safety verdict of inspect is left out (the safety checker's to give)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import fixture_run
from stack_helpers import backbone_rho, cli_ok, control_weights, inspect_json, producer, rho_reference

from ckptaudit.io.discover import discover_run
from ckptaudit.io.optimizer import load_optimizer_state, load_scheduler_state

RUNS = ["zero0", "zero1", "zero2", "zero3", "hf_ds"]
TRUNK = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.fixture(scope="module")
def root():
    return fixture_run("stack_deepspeed", adopt_threads=False)


def test_deepspeed_is_not_importable_here():
    assert importlib.util.find_spec("deepspeed") is None


def test_layouts_and_files(root):
    assert (root / "zero1" / "latest").read_text().strip() == "global_step20"
    assert (root / "zero1" / "global_step20" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert sorted(p.name for p in (root / "zero3" / "global_step20").glob("*.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (root / "hf_ds" / "checkpoint-20" / "global_step20" / "mp_rank_00_model_states.pt").is_file()


@pytest.mark.parametrize("name", RUNS)
def test_steps_counts_and_state(root, name):
    run = discover_run(root / name)
    assert run.steps == [0, 10, 20]
    assert {c.layout for c in run} == {"hf-trainer" if name == "hf_ds" else "deepspeed"}
    doc = inspect_json(root / name, "--no-file-check")
    last = doc["checkpoints"][-1]
    assert last["n_params"] == producer(root / name)["n_params"] == json.loads((root / "reference.json").read_text())["n_params"]
    assert last["artifacts"]["optimizer"] and last["artifacts"]["scheduler"]
    if name in ("zero0", "zero1", "zero2"):  # the module state dict stores the tied head under both names
        assert last["shared_tensors"] == {"lm_head.weight": "transformer.wte.weight"}


@pytest.mark.parametrize("name", RUNS)
def test_optimizer_moments_by_name_equal_torch_adamw(root, name):
    state = load_optimizer_state(discover_run(root / name).by_step(20))
    ref = json.loads((root / "reference.json").read_text())["moments"]
    assert set(state.state) == set(ref)
    for param, m in ref.items():
        assert state.state[param].step == m["step"] == 20
        if param.endswith("attn.c_attn.bias"):
            continue  # its key part gets an exactly-zero gradient: rounding noise, scaled by Adam
        for key in ("exp_avg", "exp_avg_sq"):
            got = getattr(state.state[param], key).reshape(-1)[:8].double().numpy()
            np.testing.assert_allclose(got, m[key], rtol=1e-4, atol=1e-4 * np.abs(m[key]).max(), err_msg=f"{param} {key}")
    assert load_scheduler_state(discover_run(root / name).by_step(10))["last_epoch"] == 10


@pytest.mark.parametrize("name", ["zero1", "zero3"])
def test_backbone_rho_equals_numpy_svd(root, name):
    states = []
    for step in (0, 10, 20):
        with discover_run(root / "zero2").by_step(step).tensors() as src:  # ZeRO 2's module: the full weights
            states.append({n: src.get(n).clone() for n in TRUNK})
    np.testing.assert_allclose(backbone_rho(root / name), rho_reference(states, TRUNK), rtol=1e-4)


def test_zero3_weights_reassembled_from_two_ranks_equal_zero2(root):
    for step in (0, 10, 20):
        with discover_run(root / "zero3").by_step(step).tensors() as z3, \
                discover_run(root / "zero2").by_step(step).tensors() as z2:
            assert set(z3.keys()) == set(z2.keys())
            for n in z2.keys():
                a, b = z3.get(n), z2.get(n)
                if n.endswith("attn.c_attn.bias"):  # the key bias: zero gradient, rounding noise scaled by Adam
                    keep = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])
                    a, b = a[keep], b[keep]
                # two runs (ZeRO 3 and ZeRO 2 reduce gradients differently): equal to float rounding
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=n)


@pytest.mark.parametrize("name", RUNS)
def test_control_resumed_reproduces_the_later_checkpoint(root, name):
    run = discover_run(root / name)
    got = control_weights(run.by_step(10).path, 10)
    with run.by_step(20).tensors() as src:
        for param, value in got.items():
            target = src.get(param)
            if param.endswith("attn.c_attn.bias"):
                keep = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])
                value, target = value[keep], target[keep]
            torch.testing.assert_close(value, target, rtol=1e-5, atol=1e-6, msg=param)


def test_resume_probe_and_extrapolate_from_the_cli(root):
    doc = cli_ok("resume-probe", root / "zero2" / "global_step10", "--train-steps", 2, "--preserve-optimizer", "--device", "cpu")
    assert doc["start_step"] == 10 and doc["conditions"][0]["name"] == "control"
    doc = cli_ok("resume-probe", root / "hf_ds" / "checkpoint-10", "--train-steps", 2, "--preserve-optimizer", "--device", "cpu")
    assert doc["conditions"][0]["name"] == "control"
    ext = cli_ok("extrapolate", root / "zero3", "--K", 10, "--predictor", "linear,adam-step", "--device", "cpu")
    assert any(r["loss_true"] is not None for r in ext["results"])
