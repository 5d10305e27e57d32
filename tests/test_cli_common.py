"""The setup every command shares (ckptaudit.cli.common): --no-hash on every command that writes input records, and
the one-line refusal of a torchrun launch (WORLD_SIZE > 1) by every command that runs in a single process.

The report's /inputs are read back with h5py and compared with hashlib.sha256 of the weight files, computed here."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import pytest
from cli_helpers import MINIMAL_POLICY, invoke
from conftest import make_tiny_lm_dir

WORDS = ["<unk>", "the", "old", "man", "felt", "a", "deep", "longing", "yearning", "joy", "relief", "for", "home"]



@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    """No torchrun variables and no debug mode unless a test sets them."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CKPTAUDIT_DEBUG"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def inputs(tiny_run: Path, tmp_path_factory) -> dict[str, Path]:
    """Everything the commands below read (:func:`build_inputs`)."""
    return build_inputs(tiny_run, tmp_path_factory.mktemp("cli-common"))


def build_inputs(tiny_run: Path, root: Path) -> dict[str, Path]:
    """The tiny run, a second run (a copy, for cross-seed), a tiny language model with a tokenizer, a contexts file
    and a gate policy, under ``root``."""
    other = root / "seed-b"
    shutil.copytree(tiny_run, other)
    lm = make_tiny_lm_dir(root / "tiny-lm", {w: i for i, w in enumerate(WORDS)}, unk="<unk>")
    contexts = root / "contexts.jsonl"
    contexts.write_text(json.dumps({"context": "the old man felt a deep", "target": "longing", "competitor": "yearning"}) + "\n")
    policy = root / "policy.toml"
    policy.write_text(MINIMAL_POLICY)
    return {"run": tiny_run, "other": other, "lm": lm, "contexts": contexts, "policy": policy}


def _ckpt(p: dict, step: int) -> Path:
    return p["run"] / f"checkpoint-{step}"


# command -> (its arguments (short runs), the input paths its report must list)
COMMANDS = {
    "inspect": (lambda p: ["inspect", p["run"], "--steps", "50:60"],
                lambda p: [_ckpt(p, 50), _ckpt(p, 60)]),
    # backbone and gxs velocity read the run's anchor (step 0) beside the --steps rows: it is an input too
    "backbone": (lambda p: ["backbone", p["run"], "--steps", "40:60", "--device", "cpu"],
                 lambda p: [_ckpt(p, s) for s in (0, 40, 50, 60)]),
    "fisher": (lambda p: ["fisher", p["run"], "--steps", "60", "--batches", "2", "--batch-size", "8", "--random", "1",
                          "--device", "cpu"],
               lambda p: [_ckpt(p, 60)]),
    "resume-probe": (lambda p: ["resume-probe", _ckpt(p, 60), "--train-steps", "1", "--lr-mult", "1", "--warmup-steps", "0",
                                "--no-boundary-probe", "--device", "cpu"],
                     lambda p: [_ckpt(p, 60)]),
    "gxs transplant": (lambda p: ["gxs", "transplant", _ckpt(p, 60), _ckpt(p, 30), "--heads", "0.0", "--no-control",
                                  "--device", "cpu"],
                       lambda p: [_ckpt(p, 60), _ckpt(p, 30)]),
    "gxs velocity": (lambda p: ["gxs", "velocity", p["run"], "--steps", "40:60", "--device", "cpu"],
                     lambda p: [_ckpt(p, s) for s in (0, 40, 50, 60)]),
    "gxs slack": (lambda p: ["gxs", "slack", _ckpt(p, 60), "--alpha", "1", "--sigma", "0", "--device", "cpu"],
                  lambda p: [_ckpt(p, 60)]),
    "classify-embeddings": (lambda p: ["classify-embeddings", p["lm"], "--pairs", "100", "--device", "cpu"],
                            lambda p: [p["lm"]]),
    "born-gap": (lambda p: ["born-gap", p["lm"], "--contexts", p["contexts"], "--device", "cpu"],
                 lambda p: [p["lm"]]),
    "finetune-probe": (lambda p: ["finetune-probe", p["lm"], "--contexts", p["contexts"], "--mode", "full", "--train-steps",
                                  "1", "--device", "cpu"],
                       lambda p: [p["lm"]]),
    "regimes": (lambda p: ["regimes", p["run"], "--steps", "40:60", "--device", "cpu"],
                lambda p: [_ckpt(p, s) for s in (40, 50, 60)]),
    "extrapolate": (lambda p: ["extrapolate", p["run"], "--steps", "40:60", "--predictor", "linear", "--K", "10",
                               "--device", "cpu"],
                    lambda p: [_ckpt(p, s) for s in (40, 50, 60)]),
    "cross-seed": (lambda p: ["cross-seed", p["run"], p["other"], "--steps", "50:60", "--device", "cpu"],
                   lambda p: [_ckpt(p, 50), _ckpt(p, 60), p["other"] / "checkpoint-50", p["other"] / "checkpoint-60"]),
    "gate": (lambda p: ["gate", p["run"], "--policy", p["policy"], "--device", "cpu"],
             lambda p: [_ckpt(p, 60)]),
}

SINGLE_PROCESS = [c for c in COMMANDS if c not in ("backbone", "fisher")]


def weight_file_sha256(path: Path) -> tuple[int, str]:
    """(bytes, SHA-256) of the one safetensors weight file of a checkpoint or model directory, by hashlib."""
    (weights,) = sorted(path.glob("*.safetensors"))
    data = weights.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def read_inputs(report: Path) -> list[tuple[Path, int, str]]:
    with h5py.File(report) as f:
        g = f["inputs"]
        paths = [Path(p.decode() if isinstance(p, bytes) else p) for p in g["path"][()]]
        hashes = [h.decode() if isinstance(h, bytes) else h for h in g["sha256"][()]]
        return list(zip(paths, (int(b) for b in g["bytes"][()]), hashes, strict=True))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_hash_leaves_sha256_empty_and_hashes_match_hashlib_otherwise(command, inputs, tmp_path):
    args, expected_paths = COMMANDS[command]
    expected = {p.resolve(): weight_file_sha256(p) for p in expected_paths(inputs)}

    hashed, unhashed = tmp_path / "hashed.h5", tmp_path / "unhashed.h5"
    r = invoke(*args(inputs), "--quiet", "--out", hashed)
    assert r.exit_code == 0, r.output
    r = invoke(*args(inputs), "--quiet", "--out", unhashed, "--no-hash")
    assert r.exit_code == 0, r.output

    got = read_inputs(hashed)
    assert sorted(p.resolve() for p, _, _ in got) == sorted(expected), got
    for path, size, sha in got:
        assert (size, sha) == expected[path.resolve()], path

    got_unhashed = read_inputs(unhashed)
    assert [(p, b) for p, b, _ in got_unhashed] == [(p, b) for p, b, _ in got]  # same records, only the hash left out
    assert all(sha == "" for _, _, sha in got_unhashed)


def _assert_refused(r, command: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.output)
    err = r.stderr.strip()
    assert err.startswith("ckptaudit: error:") and "\n" not in err and "Traceback" not in r.output, r.output
    assert f"ckptaudit {command}" in err and "WORLD_SIZE=2" in err and "launch it without torchrun" in err, err
    assert r.stdout == ""


@pytest.fixture()
def torchrun_env(monkeypatch, tmp_path) -> Path:
    """What rank 0 of `torchrun --nproc-per-node 2` sees, in an empty working directory (returned)."""
    for var, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531")):
        monkeypatch.setenv(var, value)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("command", SINGLE_PROCESS)
def test_single_process_command_refuses_torchrun_and_writes_nothing(command, inputs, torchrun_env):
    args, _ = COMMANDS[command]
    r = invoke(*args(inputs), "--json", "--out", torchrun_env / "report.h5")
    _assert_refused(r, command)
    assert list(torchrun_env.iterdir()) == []
    r = invoke(*args(inputs))  # and without --out: no default report in the working directory either
    _assert_refused(r, command)
    assert list(torchrun_env.iterdir()) == []


def test_report_show_and_gate_init_refuse_torchrun(inputs, torchrun_env, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE")
    report = tmp_path / "r.h5"
    assert invoke(*COMMANDS["inspect"][0](inputs), "--quiet", "--out", report).exit_code == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    _assert_refused(invoke("report", "show", report), "report show")
    _assert_refused(invoke("gate", "--init", torchrun_env / "policy.toml"), "gate --init")
    _assert_refused(invoke("gate", "--init"), "gate --init")
    assert list(torchrun_env.iterdir()) == []


def test_world_size_one_is_a_single_process(inputs, monkeypatch, tmp_path):
    """torchrun with one process (WORLD_SIZE=1) is a plain run: nothing refused."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    r = invoke("inspect", inputs["run"], "--steps", "60", "--json", "--no-report")
    assert r.exit_code == 0, r.output
    assert [c["step"] for c in json.loads(r.stdout)["checkpoints"]] == [60]
