"""Shared by the tests of other training stacks' layouts (fixtures/stacks.py writes them): independent references
for backbone (numpy SVD of the stacked drift), resume-probe (CONTROL against the producer's later checkpoint) and the
CLI runs every stack must pass."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from cli_helpers import invoke

from ckptaudit.analyses.resume.run import ConditionSpec, ResumeSettings, run_condition

CONTROL = ConditionSpec("control", "preserved", 1.0, 0, "saved")
RESET = ConditionSpec("reset", "reset", 1.0, 0, "constant")


def producer(run_dir: Path) -> dict:
    """The producer's record of the live run (fixtures/stacks.py): n_params, moments by name."""
    return json.loads((Path(run_dir) / "producer.json").read_text())


def rho_reference(states: Sequence[dict[str, torch.Tensor]], names: Sequence[str]) -> np.ndarray:
    """rho_k = sigma_k^2 / sum sigma^2 of X = [theta(t) - theta(first)] over ``names``, by numpy's SVD."""
    flat = [np.concatenate([s[n].double().reshape(-1).numpy() for n in names]) for s in states]
    X = np.stack([f - flat[0] for f in flat[1:]])
    sigma = np.linalg.svd(X, compute_uv=False)
    return sigma**2 / np.sum(sigma**2)


def backbone_rho(run_dir: Path, *extra: str) -> list[float]:
    """``ckptaudit backbone RUN --json`` trunk rho (exit 0 asserted)."""
    r = invoke("backbone", run_dir, "--json", "--no-report", "--device", "cpu", *extra)
    assert r.exit_code == 0, (r.output, r.stderr)
    return json.loads(r.stdout)["trunk"]["rho"]


def inspect_json(run_dir: Path, *extra: str) -> dict:
    r = invoke("inspect", run_dir, "--json", "--no-report", "--no-hash", *extra)
    assert r.exit_code == 0, (r.output, r.stderr)
    return json.loads(r.stdout)


def control_weights(ckpt: Path, steps: int) -> dict[str, torch.Tensor]:
    """The model's parameters after CONTROL resumed ``steps`` steps from ``ckpt``, through the CLI's input path."""
    from conftest import build_threads

    from ckptaudit.analyses.resume.conditions import probe_inputs_from_checkpoint

    previous = torch.get_num_threads()
    threads = build_threads(ckpt)  # float reductions over another thread count round differently
    if threads:
        torch.set_num_threads(threads)
    try:
        inputs = probe_inputs_from_checkpoint(ckpt, device="cpu")
        _, model = run_condition(CONTROL, inputs, ResumeSettings(steps=steps, eval_every=steps))
    finally:
        torch.set_num_threads(previous)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_close_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                         rename: Callable[[str], str] = lambda n: n) -> None:
    assert got, "no parameters"
    for name, value in got.items():
        torch.testing.assert_close(value, want[rename(name)].to(value.dtype), rtol=1e-5, atol=1e-7, msg=name)


def cli_ok(*args: object) -> dict:
    """Run the CLI with --json --no-report; exit 0 asserted; the JSON document returned."""
    r = invoke(*args, "--json", "--no-report")
    assert r.exit_code == 0, (r.output, r.stderr)
    return json.loads(r.stdout)
