"""Optimizer state that loads weights-only but breaks the schema (io/optimizer_schema.py) is refused where it is read.

References: torch's own AdamW constructor for the hyper-parameter ranges; the planted edits for the structure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import MINIMAL_POLICY, assert_one_line_error, invoke

from ckptaudit.errors import CorruptFileError
from ckptaudit.io.optimizer_schema import validate_optimizer_state


def _real_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


def test_a_real_adamw_state_passes():
    validate_optimizer_state(_real_state(), "optimizer.pt")
    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    validate_optimizer_state(sgd.state_dict(), "optimizer.pt")  # no state yet


@pytest.mark.parametrize("key, value", [("betas", (2.0, -1.0)), ("betas", (0.9, 1.0)), ("lr", -1.0),
                                        ("eps", -1e-8), ("weight_decay", -0.1)])
def test_hyper_parameters_torch_refuses_are_refused(key, value):
    """torch.optim.AdamW itself rejects these values: the schema agrees, value by value."""
    sd = _real_state()
    with pytest.raises(ValueError):
        torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), **{key: value})
    sd["param_groups"][0][key] = value
    with pytest.raises(CorruptFileError, match=key):
        validate_optimizer_state(sd, "optimizer.pt")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "0.1"])
def test_lr_must_be_a_finite_number(value):
    sd = _real_state()
    sd["param_groups"][0]["lr"] = value
    with pytest.raises(CorruptFileError, match="'lr'"):
        validate_optimizer_state(sd, "optimizer.pt")


def _edit(sd: dict, change: str) -> None:
    i = next(iter(sd["state"]))
    if change == "state-list":
        sd["state"] = list(sd["state"].values())
    elif change == "groups-int":
        sd["param_groups"] = [5]
    elif change == "params-not-ints":
        sd["param_groups"][0]["params"] = [0.5, None]
    elif change == "params-not-list":
        sd["param_groups"][0]["params"] = 7
    elif change == "step-text":
        sd["state"][i]["step"] = "seven"
    elif change == "exp-avg-list":
        sd["state"][i]["exp_avg"] = sd["state"][i]["exp_avg"].tolist()
    elif change == "entry-none":
        sd["state"][i] = None
    elif change == "betas":
        sd["param_groups"][0]["betas"] = (2.0, -1.0)
    elif change == "bool-index":
        sd["param_groups"][0]["params"] = [True]


CHANGES = ["state-list", "groups-int", "params-not-ints", "params-not-list", "step-text", "exp-avg-list",
           "entry-none", "betas", "bool-index"]


@pytest.mark.parametrize("change", CHANGES)
def test_structure_refused(change):
    sd = _real_state()
    _edit(sd, change)
    with pytest.raises(CorruptFileError, match="not a valid optimizer state"):
        validate_optimizer_state(sd, "optimizer.pt")


@pytest.mark.parametrize("change", ["state-list", "groups-int", "step-text", "exp-avg-list", "entry-none", "betas"])
def test_cli_refuses_each_with_one_line(tiny_checkpoint, tmp_path, change):
    """Through resume-probe and the gate: exit 2, one line naming optimizer.pt (the gate too: bad input)."""
    run = tmp_path / "run"
    run.mkdir()
    ck = Path(shutil.copytree(tiny_checkpoint, run / tiny_checkpoint.name))
    sd = torch.load(ck / "optimizer.pt", weights_only=True)
    _edit(sd, change)
    torch.save(sd, ck / "optimizer.pt")
    assert_one_line_error(invoke("resume-probe", ck, "--train-steps", 1, "--no-report", "--device", "cpu"), "optimizer.pt")
    policy = tmp_path / "policy.toml"
    policy.write_text(MINIMAL_POLICY)
    out = tmp_path / "gate.json"
    assert_one_line_error(invoke("gate", ck, "--policy", policy, "--json-out", out, "--no-report"), "optimizer.pt")
    assert not out.exists()


def test_extrapolate_notes_unusable_moments(tiny_run, tmp_path):
    """Stored param_names that match no weight, or a negative exp_avg_sq: adam-step is skipped with a note instead
    of predicting a silent zero update (or NaN)."""
    import json

    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-40", "checkpoint-50", "checkpoint-60"):
        shutil.copytree(tiny_run / name, run / name)
    ck = run / "checkpoint-60"
    sd = torch.load(ck / "optimizer.pt", weights_only=True)
    n = sum(len(g["params"]) for g in sd["param_groups"])
    for g in sd["param_groups"]:
        g["param_names"] = [f"nowhere.{i}" for i in g["params"]]
    assert n > 0
    torch.save(sd, ck / "optimizer.pt")
    r = invoke("extrapolate", run, "--predictor", "adam-step", "--K", "5", "--no-report", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    notes = " ".join(doc.get("notes", []))
    assert "match no weight" in notes, notes

    sd = torch.load(tiny_run / "checkpoint-60" / "optimizer.pt", weights_only=True)
    first = next(iter(sd["state"]))
    sd["state"][first]["exp_avg_sq"] = -sd["state"][first]["exp_avg_sq"] - 1.0
    torch.save(sd, ck / "optimizer.pt")
    r = invoke("extrapolate", run, "--predictor", "adam-step", "--K", "5", "--no-report", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "negative" in " ".join(json.loads(r.stdout).get("notes", []))
