"""nanoGPT checkpoints (ckpt.pt / ckpt_N.pt with model, optimizer, model_args, iter_num, config), written by a
minimal model of nanoGPT's shape and names (fixtures/stacks.py): iter_num is the step, the optimizer entry is the
optimizer state, torch.compile's _orig_mod. prefix is removed, the model is a GPT-2 built from model_args."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, fixture_run
from stack_helpers import cli_ok, control_weights, inspect_json, producer, rho_reference

from ckptaudit.io.discover import discover_run
from ckptaudit.io.models import load_model
from ckptaudit.io.optimizer import load_optimizer_state


@pytest.fixture(scope="module")
def root():
    return fixture_run("stack_nanogpt", adopt_threads=False)


def _nanogpt_model(path):
    spec = importlib.util.spec_from_file_location("stacks", REPO_ROOT / "fixtures" / "stacks.py")
    stacks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stacks)
    ckpt = torch.load(path, weights_only=True)
    model = stacks._nanogpt_classes()(ckpt["model_args"])
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model.eval(), ckpt


def test_steps_are_iter_num(root):
    assert discover_run(root / "out").steps == [0, 10, 20]
    single = discover_run(root / "single" / "ckpt.pt")  # nanoGPT's default single file
    assert single.steps == [20] and single[0].layout == "nanogpt"
    assert discover_run(root / "single").steps == [20]


def test_names_lose_the_compile_prefix_and_the_tied_head_counts_once(root):
    doc = inspect_json(root / "out")
    last = doc["checkpoints"][-1]
    assert last["layout"] == "nanogpt"
    assert last["n_params"] == producer(root / "out")["n_params"]  # the live model's parameters().numel()
    assert last["shared_tensors"] == {"lm_head.weight": "transformer.wte.weight"}
    ckpt = discover_run(root / "out").by_step(20)
    with ckpt.tensors() as src:
        assert list(src.keys()) == producer(root / "out")["names"]  # nanoGPT's own named_parameters()
        assert src.shape("transformer.h.0.attn.c_attn.weight") == (3 * 48, 48)  # Linear [3d, d]
    nobias = inspect_json(root / "nobias")["checkpoints"][-1]
    assert nobias["n_params"] == producer(root / "nobias")["n_params"]


@pytest.mark.parametrize("sub", ["out", "nobias", "single"])
def test_model_built_from_model_args_computes_what_nanogpt_computes(root, sub):
    ckpt = discover_run(root / sub).checkpoints[-1]
    ours = load_model(ckpt)
    ref, saved = _nanogpt_model(ckpt.path)
    assert type(ours).__name__ == "GPT2LMHeadModel" and ours.config.n_embd == saved["model_args"]["n_embd"]
    ids = torch.randint(0, saved["model_args"]["vocab_size"], (5, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits[:, -1], ref(ids)[:, -1], rtol=1e-5, atol=1e-6)


def test_optimizer_moments_by_name_equal_the_live_optimizer(root):
    state = load_optimizer_state(discover_run(root / "out").by_step(20))
    live = producer(root / "out")["moments"]
    assert set(state.state) == set(live)
    for name, m in live.items():
        np.testing.assert_allclose(state.state[name].exp_avg.reshape(-1)[:8].numpy(), m["exp_avg"], rtol=1e-6)
        np.testing.assert_allclose(state.state[name].exp_avg_sq.reshape(-1)[:8].numpy(), m["exp_avg_sq"], rtol=1e-6)
        assert state.state[name].step == m["step"] == 20


def test_control_resumed_reproduces_the_later_checkpoint(root):
    got = control_weights(root / "out" / "ckpt_10.pt", 10)
    ref, _ = _nanogpt_model(root / "out" / "ckpt_20.pt")
    want = dict(ref.named_parameters())
    for name, value in got.items():
        target = want[name].detach()
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            target = target.t()  # GPT-2's Conv1D holds nanoGPT's Linear weight transposed
        torch.testing.assert_close(value, target, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_probe_and_extrapolate_from_the_cli(root):
    doc = cli_ok("resume-probe", root / "out" / "ckpt_10.pt", "--train-steps", 2, "--device", "cpu")
    assert doc["start_step"] == 10 and doc["conditions"][0]["name"] == "control"
    ext = cli_ok("extrapolate", root / "out", "--K", 10, "--device", "cpu")
    assert {r["step"] for r in ext["results"]} == {10, 20}


def test_backbone_splits_the_linear_c_attn_by_rows(root):
    """nanoGPT's c_attn is an nn.Linear [3d, d] (d = 48 here, where the GPT-2 Conv1D split once gave wrong G/S
    numbers without a word): the nanogpt family splits its rows, so G (q, k) and S (v, o, MLP) equal numpy SVDs of
    the true rows."""
    import json

    from cli_helpers import invoke

    r = invoke("backbone", root / "out", "--json", "--no-report", "--device", "cpu")
    assert r.exit_code == 0, (r.output, r.stderr)
    doc = json.loads(r.stdout)
    assert doc["settings"]["architecture"] == "nanogpt"
    states = [torch.load(root / "out" / f"ckpt_{s}.pt", weights_only=True)["model"] for s in (0, 10, 20)]
    d = 48
    rows = {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}

    def part(state, which):
        out = []
        for i in range(2):
            w = state[f"_orig_mod.transformer.h.{i}.attn.c_attn.weight"]
            if which == "G":
                out += [w[rows["q"]], w[rows["k"]]]
            else:
                out += [w[rows["v"]]] + [state[f"_orig_mod.transformer.h.{i}.{m}.weight"]
                                         for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        return {f"p{j}": t for j, t in enumerate(out)}

    for group in ("G", "S"):
        parts = [part(s, group) for s in states]
        want = rho_reference(parts, sorted(parts[0]))
        np.testing.assert_allclose(doc["groups"][group]["rho"], want[: len(doc["groups"][group]["rho"])], rtol=1e-9)
    names = [f"_orig_mod.transformer.h.{i}.{m}.weight" for i in range(2)
             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    np.testing.assert_allclose(doc["trunk"]["rho"], rho_reference(states, names)[: len(doc["trunk"]["rho"])], rtol=1e-9)
