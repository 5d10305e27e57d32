"""End to end: backbone from the CLI on short real training runs of Phi-3 (fused qkv_proj / gate_up_proj) and
Mixtral (stacked experts), against a numpy SVD of the stacked trunk drift whose tensors the test names itself."""

from __future__ import annotations

import json

import families as F
import numpy as np
import pytest
import torch
from cli_helpers import invoke

STEPS = (0, 1, 2, 3, 4, 5)
# The trunk, named here independently of the architecture files: attention and MLP matrices of every block.
TRUNK = {
    "phi3": ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"),
    "mixtral": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
}


def _train_run(name: str, root) -> tuple:
    """A few AdamW steps of the family's tiny model on random tokens, save_pretrained after each (step_N/)."""
    model = F.build(name, seed=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    states = []
    for step in range(STEPS[-1] + 1):
        if step:
            ids = torch.randint(1, F.VOCAB, (4, 12), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(root / f"step_{step}")
        states.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
    return root, states


_RUNS: dict = {}


def _run(name: str, tmp_path_factory):
    if name not in _RUNS:
        _RUNS[name] = (name, *_train_run(name, tmp_path_factory.mktemp(name)))
    return _RUNS[name]


@pytest.fixture(params=sorted(TRUNK))
def family_run(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory)


def _trunk_names(name: str, state: dict) -> list[str]:
    return [k for k in state if k.startswith("model.layers.") and k.split(".", 3)[3] in TRUNK[name]]


def _rho(rows: list[np.ndarray]) -> np.ndarray:
    s = np.linalg.svd(np.stack(rows), compute_uv=False)
    return s**2 / np.sum(s**2)


@pytest.mark.slow
def test_backbone_rho_equals_a_numpy_svd_of_the_whole_trunk(family_run, tmp_path):
    name, root, states = family_run
    result = invoke("backbone", root, "--json", "--no-report", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["architecture"] == name and not report["settings"]["missing_trunk"]
    names = _trunk_names(name, states[0])
    assert len(names) == F.N_LAYERS * len(TRUNK[name])
    rows = [np.concatenate([(s[n] - states[0][n]).numpy().ravel() for n in names]) for s in states[1:]]
    assert report["dims"]["trunk"] == rows[0].size
    want = _rho(rows)
    np.testing.assert_allclose(report["trunk"]["rho"], want[: len(report["trunk"]["rho"])], rtol=1e-9, atol=1e-12)
    if name == "mixtral":  # every expert of every block: its own gate|up and down slices
        assert len(report["experts"]) == F.N_LAYERS * F.N_EXPERTS
        for b in range(F.N_LAYERS):
            for e in range(F.N_EXPERTS):
                parts = [f"model.layers.{b}.mlp.experts.gate_up_proj", f"model.layers.{b}.mlp.experts.down_proj"]
                erows = [np.concatenate([(s[n][e] - states[0][n][e]).numpy().ravel() for n in parts])
                         for s in states[1:]]
                got = report["experts"][f"{b}.{e}"]["rho"]
                np.testing.assert_allclose(got, _rho(erows)[: len(got)], rtol=1e-9, atol=1e-12)


def test_a_trunk_missing_its_mlp_is_refused_unless_allowed(tmp_path_factory, tmp_path):
    """A family file that knows the attention but not the MLP (as the older registry did for Mixtral): backbone
    stops with one line naming what is missing; --allow-partial-trunk analyses the attention alone."""
    name, root, states = _run("mixtral", tmp_path_factory)
    older = tmp_path / "mixtral-without-experts.toml"
    older.write_text('name = "mixtral"\nextends = "llama"\nmodel_types = ["mixtral"]\n')
    result = invoke("backbone", root, "--json", "--no-report", "--device", "cpu", "--role-map", older)
    assert result.exit_code == 2 and "trunk is incomplete" in result.stderr and "--allow-partial-trunk" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = invoke("backbone", root, "--json", "--no-report", "--device", "cpu", "--role-map", older,
                    "--allow-partial-trunk")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    attention = [n for n in _trunk_names(name, states[0]) if ".self_attn." in n]
    rows = [np.concatenate([(s[n] - states[0][n]).numpy().ravel() for n in attention]) for s in states[1:]]
    assert report["dims"]["trunk"] == rows[0].size and report["settings"]["missing_trunk"]
    np.testing.assert_allclose(report["trunk"]["rho"], _rho(rows)[: len(report["trunk"]["rho"])], rtol=1e-9,
                               atol=1e-12)
