"""Run folders as the libraries leave them: a Trainer output_dir with the final model, extra model folders and
logs beside checkpoint-N/ (the trajectory is kept, the rest listed with the reason), and Accelerate's automatic
naming (checkpoints/checkpoint_K counts saves; the config sits in the project folder above)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import invoke
from conftest import fixture_run
from safetensors.torch import load_file
from stack_helpers import (
    assert_close_weights,
    backbone_rho,
    cli_ok,
    control_weights,
    inspect_json,
    producer,
    rho_reference,
)

GPT2_TRUNK = [f"transformer.h.{i}.{m}.weight" for i in range(2)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.fixture(scope="module")
def hf_output():
    return fixture_run("stack_hf_output", adopt_threads=False)


@pytest.fixture(scope="module")
def accelerate_run():
    return fixture_run("stack_accelerate", adopt_threads=False)


def test_trainer_output_dir_keeps_the_trajectory_and_lists_the_rest(hf_output):
    doc = inspect_json(hf_output)
    assert [c["step"] for c in doc["checkpoints"]] == [2, 4, 6]
    left = {p.rsplit("/", 1)[-1]: why for p, why in ((e["path"], e["why"]) for e in doc["left_out"])}
    assert set(left) == {"best", "sharded-final", "model.safetensors", "runs"}
    assert "trainer.save_model" in left["model.safetensors"] and "no training step" in left["best"]
    assert doc["checkpoints"][-1]["n_params"] == producer(hf_output)["n_params"]
    r = invoke("inspect", hf_output, "--no-report", "--no-hash")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("left out:")]
    assert len(lines) == 4 and any(ln.endswith("training logs (TensorBoard), not a checkpoint") for ln in lines)


def test_trainer_output_dir_backbone_equals_numpy_svd(hf_output):
    states = [load_file(hf_output / f"checkpoint-{s}" / "model.safetensors") for s in (2, 4, 6)]
    np.testing.assert_allclose(backbone_rho(hf_output), rho_reference(states, GPT2_TRUNK), rtol=1e-9)


def test_a_left_out_folder_still_audits_alone(hf_output):
    doc = inspect_json(hf_output / "sharded-final")
    assert len(doc["checkpoints"]) == 1 and doc["checkpoints"][0]["n_params"] == producer(hf_output)["n_params"]


def test_accelerate_automatic_naming_steps_and_config_above(accelerate_run):
    from ckptaudit.io.discover import discover_run

    run = discover_run(accelerate_run)
    assert run.steps == [0, 10, 20]  # optimizer steps, not the save index of checkpoint_K
    assert [c.path.name for c in run] == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    assert all(c.config_file == accelerate_run / "config.json" for c in run)
    doc = inspect_json(accelerate_run)
    assert doc["architecture"] == "gpt2" and doc["checkpoints"][0]["n_params"] == producer(accelerate_run)["n_params"]


def test_accelerate_control_reproduces_the_next_save(accelerate_run):
    ckpts = accelerate_run / "checkpoints"
    got = control_weights(ckpts / "checkpoint_1", 10)
    assert_close_weights(got, load_file(ckpts / "checkpoint_2" / "model.safetensors"),
                         rename=lambda n: "transformer.wte.weight" if n == "lm_head.weight" else n)
    doc = cli_ok("resume-probe", ckpts / "checkpoint_1", "--train-steps", 2, "--device", "cpu")
    assert doc["start_step"] == 10 and doc["conditions"][0]["name"] == "control"
    ext = cli_ok("extrapolate", accelerate_run, "--K", 10, "--device", "cpu")
    assert {r["step"] for r in ext["results"]} == {10, 20}
    assert json.loads((ckpts / "checkpoint_1" / "ckptaudit_task.json").read_text())["task"] == "modadd"


def test_accelerate_backbone_and_moments(accelerate_run):
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.optimizer import load_optimizer_state

    states = [load_file(accelerate_run / "checkpoints" / f"checkpoint_{k}" / "model.safetensors") for k in (0, 1, 2)]
    np.testing.assert_allclose(backbone_rho(accelerate_run), rho_reference(states, GPT2_TRUNK), rtol=1e-9)
    state = load_optimizer_state(discover_run(accelerate_run).by_step(20))
    live = producer(accelerate_run)["moments"]
    assert set(state.state) == set(live)
    for name, m in live.items():
        np.testing.assert_allclose(state.state[name].exp_avg.reshape(-1)[:8].numpy(), m["exp_avg"], rtol=1e-6)
        assert state.state[name].step == m["step"] == 20
