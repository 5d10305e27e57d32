"""Lightning epoch=E-step=N.ckpt written by lightning's Trainer (fixtures/stacks.py): the LightningModule
attribute prefix is found by matching the model's names, optimizer_states / lr_schedulers are the training
state, the model config comes from hyper_parameters or a config.json next to the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fixture_run
from stack_helpers import backbone_rho, cli_ok, control_weights, inspect_json, producer, rho_reference

from ckptaudit.io.discover import discover_run
from ckptaudit.io.models import load_model
from ckptaudit.io.optimizer import load_optimizer_state, load_scheduler_state

TRUNK = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
PREFIX = {"hparams": "model.", "configjson": "net."}


@pytest.fixture(scope="module")
def root():
    return fixture_run("stack_lightning", adopt_threads=False)


def _ckpt_dir(root, sub):
    return root / sub / "lightning_logs" / "version_0" / "checkpoints"


def _stored(root, sub, step):
    return torch.load(_ckpt_dir(root, sub) / f"epoch=0-step={step}.ckpt", weights_only=True)


@pytest.mark.parametrize("sub", ["hparams", "configjson"])
def test_run_steps_names_and_counts(root, sub):
    run = discover_run(root / sub)  # the default_root_dir: lightning_logs/version_0/checkpoints/ is found
    assert run.steps == [5, 10, 15, 20] and all(c.layout == "lightning" for c in run)
    stored = _stored(root, sub, 20)["state_dict"]
    assert all(k.startswith(PREFIX[sub]) for k in stored)
    with run.by_step(20).tensors() as src:
        assert set(src.keys()) == {k[len(PREFIX[sub]):] for k in stored} - {"lm_head.weight"}
        assert torch.equal(src.get("transformer.h.1.mlp.c_fc.weight"), stored[PREFIX[sub] + "transformer.h.1.mlp.c_fc.weight"])
    doc = inspect_json(root / sub)
    last = doc["checkpoints"][-1]
    assert doc["architecture"] == "gpt2"
    assert last["n_params"] == producer(root / sub)["n_params"]  # the tied head stored twice counts once
    assert last["shared_tensors"] == {"lm_head.weight": "transformer.wte.weight"}
    assert last["artifacts"]["optimizer"] and last["artifacts"]["scheduler"]


@pytest.mark.parametrize("sub", ["hparams", "configjson"])
def test_model_filled_from_the_prefixed_state_dict(root, sub):
    ckpt = discover_run(root / sub).by_step(15)
    model = load_model(ckpt)
    stored = _stored(root, sub, 15)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[PREFIX[sub] + name]), name


def test_backbone_rho_equals_numpy_svd(root):
    states = [{k[len("model."):]: v for k, v in _stored(root, "hparams", s)["state_dict"].items()} for s in (5, 10, 15, 20)]
    np.testing.assert_allclose(backbone_rho(root / "hparams"), rho_reference(states, TRUNK), rtol=1e-9)


def test_optimizer_and_scheduler_state_by_name(root):
    ckpt = discover_run(root / "hparams").by_step(20)
    state = load_optimizer_state(ckpt)
    live = producer(root / "hparams")["moments"]
    assert set(state.state) == set(live)
    for name, m in live.items():
        np.testing.assert_allclose(state.state[name].exp_avg.reshape(-1)[:8].numpy(), m["exp_avg"], rtol=1e-6)
        np.testing.assert_allclose(state.state[name].exp_avg_sq.reshape(-1)[:8].numpy(), m["exp_avg_sq"], rtol=1e-6)
        assert state.state[name].step == m["step"] == 20
    assert load_scheduler_state(ckpt)["last_epoch"] == 20


def test_control_resumed_reproduces_the_later_checkpoint(root):
    got = control_weights(_ckpt_dir(root, "hparams") / "epoch=0-step=10.ckpt", 10)
    want = _stored(root, "hparams", 20)["state_dict"]
    for name, value in got.items():
        target = want["model." + name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias gets an exactly-zero gradient (softmax is shift-invariant): what reaches it is
            # float rounding, which Adam divides by its own square root; two summation orders differ there.
            keep = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])
            value, target = value[keep], target[keep]
        torch.testing.assert_close(value, target, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_probe_and_extrapolate_from_the_cli(root):
    doc = cli_ok("resume-probe", _ckpt_dir(root, "configjson") / "epoch=0-step=10.ckpt", "--train-steps", 2, "--device", "cpu")
    assert doc["start_step"] == 10 and doc["conditions"][0]["name"] == "control"
    ext = cli_ok("extrapolate", root / "configjson", "--K", 5, "--predictor", "linear,adam-step", "--device", "cpu")
    assert {r["step"] for r in ext["results"]} == {5, 10, 15, 20}
