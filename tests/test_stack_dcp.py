"""torch.distributed.checkpoint runs written by dcp.save (fixtures/stacks.py): get_state_dict(model, optimizer)
folders and torchtitan's checkpoint/step-N/ layout (model names at the top level beside optimizer,
lr_scheduler, dataloader and train_state subtrees). Only the model is weights; the optimizer state is read by
parameter name, non-tensor items through weights-only loads of their byte ranges.

The file-safety verdict of inspect on .distcp files is left out here (it is the safety checker's to give)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import fixture_run
from stack_helpers import backbone_rho, cli_ok, control_weights, inspect_json, producer, rho_reference

from ckptaudit.io.discover import discover_run
from ckptaudit.io.optimizer import load_optimizer_state, load_scheduler_state

TRUNK = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.fixture(scope="module")
def root():
    return fixture_run("stack_dcp", adopt_threads=False)


def _folder(root, sub, step):
    return root / sub / (f"step_{step}" if sub == "plain" else f"checkpoint/step-{step}")


def _model_tensors(folder, prefix):
    """The model tensors as torch's own DCP loader reads them (trusted fixture: plain torch API)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = FileSystemReader(str(folder)).read_metadata()
        sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
              if isinstance(v, TensorStorageMetadata) and k.startswith(prefix) and "optimizer" not in k
              and "train_state" not in k}
        dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}


@pytest.mark.parametrize("sub", ["plain", "titan"])
def test_only_the_model_is_weights_and_counts_once(root, sub):
    run = discover_run(root / sub)  # titan: RUN/checkpoint/ is searched
    assert run.steps == [0, 10, 20] and all(c.layout == "dcp" for c in run)
    doc = inspect_json(root / sub, "--no-file-check")
    last = doc["checkpoints"][-1]
    assert last["n_params"] == producer(root / sub)["n_params"]  # 1x, not model + optimizer moments
    assert last["shared_tensors"] == {"lm_head.weight": "transformer.wte.weight"}  # tied, written twice by DCP
    assert last["artifacts"]["optimizer"] and last["artifacts"]["scheduler"] == (sub == "titan")
    with run.by_step(20).tensors() as src:
        assert not any(k.startswith(("optimizer", "lr_scheduler", "train_state", "dataloader")) for k in src.keys())


@pytest.mark.parametrize("sub", ["plain", "titan"])
def test_backbone_rho_equals_numpy_svd(root, sub):
    prefix = "model." if sub == "plain" else ""
    states = [_model_tensors(_folder(root, sub, s), prefix) for s in (0, 10, 20)]
    np.testing.assert_allclose(backbone_rho(root / sub), rho_reference(states, TRUNK), rtol=1e-9)


@pytest.mark.parametrize("sub", ["plain", "titan"])
def test_optimizer_moments_by_name_equal_the_live_optimizer(root, sub):
    state = load_optimizer_state(discover_run(root / sub).by_step(20))
    assert state.mapping == "param_names"
    live = producer(root / sub)["moments"]
    assert set(state.state) == set(live)
    for name, m in live.items():
        np.testing.assert_allclose(state.state[name].exp_avg.reshape(-1)[:8].numpy(), m["exp_avg"], rtol=1e-6)
        np.testing.assert_allclose(state.state[name].exp_avg_sq.reshape(-1)[:8].numpy(), m["exp_avg_sq"], rtol=1e-6)
        # get_state_dict initialises an empty optimizer with one zero-gradient step (lr 0) at step 0: the live
        # optimizer counts it too
        assert state.state[name].step == m["step"] == 21
    assert [g["weight_decay"] for g in state.groups] == [0.1, 0.0]


def test_torchtitan_scheduler_and_control(root):
    sched = load_scheduler_state(discover_run(root / "titan").by_step(10))
    assert sched["last_epoch"] == 10 and sched["base_lrs"] == [0.01, 0.01]
    got = control_weights(_folder(root, "titan", 10), 10)
    want = _model_tensors(_folder(root, "titan", 20), "")
    for name, value in got.items():
        target = want[name]
        if name.endswith("attn.c_attn.bias"):  # the key bias: zero gradient, rounding noise scaled by Adam
            keep = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])
            value, target = value[keep], target[keep]
        torch.testing.assert_close(value, target, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_probe_and_extrapolate_from_the_cli(root):
    doc = cli_ok("resume-probe", _folder(root, "titan", 10), "--train-steps", 2, "--preserve-optimizer", "--device", "cpu")
    assert doc["start_step"] == 10 and doc["conditions"][0]["name"] == "control"
    plain = cli_ok("resume-probe", _folder(root, "plain", 10), "--train-steps", 2, "--preserve-optimizer", "--device", "cpu")
    assert any("no saved scheduler state" in n for n in plain["notes"])
    ext = cli_ok("extrapolate", root / "titan", "--K", 10, "--predictor", "linear,adam-step", "--device", "cpu")
    assert {r["step"] for r in ext["results"]} <= {0, 10, 20} and any(r["loss_true"] for r in ext["results"])
