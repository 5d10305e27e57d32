"""PEFT LoRA runs written by transformers' Trainer with a PEFT model (fixtures/stacks.py): the trajectory is the
merged deltas (alpha/r) B A per module (transposed for fan_in_fan_out), equal to the run merged by PEFT's own
merge_and_unload; commands that run the model follow base_model_name_or_path, with one clear error without it
(resume-probe: tests/test_stack_peft_resume.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from conftest import fixture_run
from runs import write_checkpoint
from stack_helpers import backbone_rho, cli_ok, inspect_json, producer, rho_reference

from ckptaudit.io.discover import discover_run
from ckptaudit.io.models import load_model
from ckptaudit.io.optimizer import load_optimizer_state

STEPS = (2, 4, 6)
TASK = "modadd:p=13,train_frac=0.6"


@pytest.fixture(scope="module")
def root():
    return fixture_run("stack_peft", adopt_threads=False)


def _merged(root, step):
    """The checkpoint merged by PEFT itself (float64 base, so the merge adds no float32 rounding)."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(root / "base", dtype=torch.float64)
    model = PeftModel.from_pretrained(base, root / "run" / f"checkpoint-{step}").merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def merged_run(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged")
    shutil.copy(root / "base" / "config.json", out / "config.json")
    states = {}
    for step in STEPS:
        states[step] = _merged(root, step)
        write_checkpoint(out / f"checkpoint-{step}", {k: v for k, v in states[step].items() if k != "lm_head.weight"})
    return out, states


def test_adapter_run_layout(root):
    run = discover_run(root / "run")
    assert run.steps == list(STEPS) and {c.layout for c in run} == {"peft"}
    assert [p.rsplit("/", 1)[-1] for p, _ in run.left_out] == ["adapter_model.safetensors"]  # save_model's copy
    doc = inspect_json(root / "run")
    assert doc["architecture"] == "gpt2"  # from the base model's config
    last = doc["checkpoints"][-1]
    # the effective model: the base's weights, of which the adapted ones (c_attn, c_fc of two blocks) move
    from safetensors.torch import load_file

    assert last["n_params"] == sum(t.numel() for t in load_file(root / "base" / "model.safetensors").values())
    with discover_run(root / "run").by_step(6).tensors() as src:
        moving = [n for n in src.keys() if bool(src.get(n).abs().max() > 0)]
    assert sorted(moving) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc"))
    assert last["artifacts"]["optimizer"] and last["artifacts"]["trainer_state"]


def test_merged_deltas_equal_merge_and_unload_drift(root):
    first = _merged(root, STEPS[0])
    for step in STEPS[1:]:
        full = _merged(root, step)
        with discover_run(root / "run").by_step(step).tensors() as src, \
                discover_run(root / "run").by_step(STEPS[0]).tensors() as anchor:
            for name in src.keys():
                drift = src.get(name) - anchor.get(name)
                np.testing.assert_allclose(drift.numpy(), (full[name] - first[name]).numpy(), rtol=0, atol=1e-12)


def test_backbone_equals_the_merged_run(root, merged_run):
    out, states = merged_run
    names = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    ours, theirs = backbone_rho(root / "run"), backbone_rho(out)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours, rho_reference([states[s] for s in STEPS], names), rtol=0, atol=1e-10)


def test_model_is_the_base_with_the_adapter_merged(root):
    model = load_model(discover_run(root / "run").by_step(4))
    want = _merged(root, 4)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value.double(), want[name], rtol=0, atol=1e-7, msg=name)


def test_optimizer_moments_are_the_adapter_parameters(root):
    state = load_optimizer_state(discover_run(root / "run").by_step(6))
    live = {k.replace(".default.", "."): v for k, v in producer(root)["moments"].items()}
    assert set(state.state) == set(live)
    for name, m in live.items():
        np.testing.assert_allclose(state.state[name].exp_avg.reshape(-1)[:8].numpy(), m["exp_avg"], rtol=1e-6)
        assert state.state[name].step == m["step"] == 6


def test_commands_that_run_the_model(root, tmp_path):
    ext = cli_ok("extrapolate", root / "run", "--K", 2, "--task", TASK, "--device", "cpu")
    assert any(r["loss_true"] is not None for r in ext["results"])
    assert any("match no weight" in n for n in ext["notes"])  # moments of A and B: no adam-step
    alone = tmp_path / "run"
    shutil.copytree(root / "run", alone)  # without the base model beside it
    r = invoke("extrapolate", alone, "--K", 2, "--task", TASK, "--no-report")
    assert_one_line_error(r, "the base model 'base' of this adapter is not available", "hf download base")
    cfg = json.loads((alone / "checkpoint-2" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "base"
