"""GPT-NeoX / Pythia layout: save_pretrained stores the head as ``embed_out.weight`` while transformers 5's module
calls it ``lm_head``; every command that builds the model maps the names with transformers' own key renaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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

TRUNK = [f"gpt_neox.layers.{i}.{m}.weight" for i in range(2) for m in (
    "attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]


@pytest.fixture(scope="module")
def run():
    return fixture_run("stack_neox", adopt_threads=False)


def test_head_is_stored_as_embed_out(run):
    stored = load_file(run / "checkpoint-20" / "model.safetensors")
    assert "embed_out.weight" in stored and "lm_head.weight" not in stored


def test_load_model_maps_embed_out_and_matches_transformers_loading(run):
    from transformers import GPTNeoXForCausalLM

    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model

    ckpt = discover_run(run).by_step(20)
    ours = load_model(ckpt)
    theirs = GPTNeoXForCausalLM.from_pretrained(run / "checkpoint-20").eval()
    stored = load_file(run / "checkpoint-20" / "model.safetensors")
    assert torch.equal(ours.lm_head.weight, stored["embed_out.weight"])
    ids = torch.randint(0, ours.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)


def test_inspect_counts_every_parameter(run):
    doc = inspect_json(run)
    assert [c["step"] for c in doc["checkpoints"]] == [0, 10, 20]
    stored = load_file(run / "checkpoint-20" / "model.safetensors")
    want = sum(t.numel() for t in stored.values())
    assert doc["checkpoints"][-1]["n_params"] == want == producer(run)["n_params"]


def test_backbone_rho_equals_numpy_svd(run):
    states = [load_file(run / f"checkpoint-{s}" / "model.safetensors") for s in (0, 10, 20)]
    np.testing.assert_allclose(backbone_rho(run), rho_reference(states, TRUNK), rtol=1e-9)


def test_optimizer_moments_by_name_equal_the_live_optimizer(run):
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.optimizer import load_optimizer_state

    state = load_optimizer_state(discover_run(run).by_step(20))
    live = producer(run)["moments"]
    assert set(state.state) == set(live)
    for name, m in live.items():
        np.testing.assert_allclose(state.state[name].exp_avg.reshape(-1)[:8].numpy(), m["exp_avg"], rtol=1e-6)
        np.testing.assert_allclose(state.state[name].exp_avg_sq.reshape(-1)[:8].numpy(), m["exp_avg_sq"], rtol=1e-6)
        assert state.state[name].step == m["step"]


def test_control_resumed_reproduces_the_later_checkpoint(run):
    got = control_weights(run / "checkpoint-10", 10)
    want = load_file(run / "checkpoint-20" / "model.safetensors")
    assert_close_weights(got, want, rename=lambda n: "embed_out.weight" if n == "lm_head.weight" else n)


def test_resume_probe_and_extrapolate_run_from_the_cli(run):
    doc = cli_ok("resume-probe", run / "checkpoint-10", "--train-steps", 2, "--device", "cpu")
    assert [c["name"] for c in doc["conditions"]][0] == "control"
    ext = cli_ok("extrapolate", run, "--K", 10, "--device", "cpu")
    # the true loss at step 20 is the held-out loss of the model transformers itself loads from checkpoint-20
    from transformers import GPTNeoXForCausalLM

    from ckptaudit.tasks import task_from_checkpoint_dir

    task = task_from_checkpoint_dir(run / "checkpoint-20")
    loss, _ = task.evaluate(GPTNeoXForCausalLM.from_pretrained(run / "checkpoint-20"), "validation")
    true = {r["loss_true"] for r in ext["results"] if r["step"] == 10}
    assert len(true) == 1 and true.pop() == pytest.approx(loss, rel=1e-9)
