"""The Python API (ckptaudit.api): every function returns the result whose to_json() is the command's --json for the
same options, raises the command's error, never prints; `import ckptaudit` stays free of torch; the README's
Python example runs as written on the tiny fixture run.

Each function is also checked against an independent reference: safetensors' own reader, numpy's SVD of the
drift matrix, hashlib over the stored tensors, a brute-force sum over all embedding pairs, a transformers forward
pass, the regime rule applied by hand, the linear prediction computed from the stored tensors, and a run compared
with a copy of itself."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke
from safetensors import safe_open
from test_cli_common import WORDS, build_inputs

import ckptaudit
from ckptaudit.errors import CkptAuditError

REPO = Path(__file__).resolve().parents[1]
WALL_TIME = {"timing_seconds", "seconds"}


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def inputs(tiny_run: Path, tmp_path_factory) -> dict[str, Path]:
    """The same files as the CLI tests read (test_cli_common.build_inputs)."""
    return build_inputs(tiny_run, tmp_path_factory.mktemp("api"))


def _ckpt(p: dict, step: int) -> Path:
    return p["run"] / f"checkpoint-{step}"


# function -> (the API call, the same options on the command line); short runs, as in test_cli_common
CASES = {
    "inspect": (lambda p: ckptaudit.inspect(p["run"], steps=[50, 60]),
                lambda p: ["inspect", p["run"], "--steps", "50:60"]),
    "backbone": (lambda p: ckptaudit.backbone(str(p["run"]), steps="40:60", device="cpu"),
                 lambda p: ["backbone", p["run"], "--steps", "40:60", "--device", "cpu"]),
    "fisher": (lambda p: ckptaudit.fisher(p["run"], steps=60, batches=2, batch_size=8, n_random=1, device="cpu"),
               lambda p: ["fisher", p["run"], "--steps", "60", "--batches", "2", "--batch-size", "8", "--random", "1",
                          "--device", "cpu"]),
    "resume_probe": (lambda p: ckptaudit.resume_probe(_ckpt(p, 60), train_steps=1, lr_mults=[1.0], warmup_steps=0,
                                                      boundary_probe=False, device="cpu"),
                     lambda p: ["resume-probe", _ckpt(p, 60), "--train-steps", "1", "--lr-mult", "1", "--warmup-steps",
                                "0", "--no-boundary-probe", "--device", "cpu"]),
    "classify_embeddings": (lambda p: ckptaudit.classify_embeddings(p["lm"], exact=True, bootstrap=20, device="cpu"),
                            lambda p: ["classify-embeddings", p["lm"], "--exact", "--bootstrap", "20", "--device", "cpu"]),
    "born_gap": (lambda p: ckptaudit.born_gap(p["lm"], p["contexts"], device="cpu"),
                 lambda p: ["born-gap", p["lm"], "--contexts", p["contexts"], "--device", "cpu"]),
    "regimes": (lambda p: ckptaudit.regimes(p["run"], steps="30:60", thresholds=(0.9, 0.999), bootstrap=10, device="cpu"),
                lambda p: ["regimes", p["run"], "--steps", "30:60", "--thresholds", "0.9,0.999", "--bootstrap", "10",
                           "--device", "cpu"]),
    "extrapolate": (lambda p: ckptaudit.extrapolate(p["run"], steps="40:60", predictors=["linear"], K=[10], device="cpu"),
                    lambda p: ["extrapolate", p["run"], "--steps", "40:60", "--predictor", "linear", "--K", "10",
                               "--device", "cpu"]),
    "cross_seed": (lambda p: ckptaudit.cross_seed([p["run"], p["other"]], steps="50:60", device="cpu"),
                   lambda p: ["cross-seed", p["run"], p["other"], "--steps", "50:60", "--device", "cpu"]),
    "run_gate": (lambda p: ckptaudit.run_gate(p["run"], p["policy"], device="cpu"),
             lambda p: ["gate", p["run"], "--policy", p["policy"], "--device", "cpu", "--json"]),
}


def _without_wall_time(x):
    if isinstance(x, dict):
        return {k: _without_wall_time(v) for k, v in x.items() if k not in WALL_TIME}
    if isinstance(x, list):
        return [_without_wall_time(v) for v in x]
    return x


def _cli_json(args: list) -> dict:
    r = invoke(*args) if "--json" in args else invoke(*args, "--json")
    assert r.exit_code == 0, (r.output, r.stderr)
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def results(inputs) -> dict:
    """Each API function's result on the short options, computed once for the checks below."""
    return {}


def _result(name: str, inputs: dict, results: dict):
    if name not in results:
        results[name] = CASES[name][0](inputs)
    return results[name]


@pytest.mark.parametrize("name", list(CASES))
def test_to_json_is_the_commands_json(name, inputs, results, capsys):
    result = _result(name, inputs, results)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""  # the API never prints
    api_doc = result.to_json()
    cli_doc = _cli_json(CASES[name][1](inputs))
    assert _without_wall_time(api_doc) == _without_wall_time(cli_doc)


# ------------------------------------------------------------------------------------- independent references


def test_inspect_counts_the_parameters_safetensors_holds(inputs, results):
    result = _result("inspect", inputs, results)
    for c in result.to_json()["checkpoints"]:
        with safe_open(str(_ckpt(inputs, c["step"]) / "model.safetensors"), framework="np") as f:
            total = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        assert c["n_params"] == total
    assert [c["step"] for c in result.to_json()["checkpoints"]] == [50, 60]


def test_progress_is_told_the_work_done_and_its_total(inputs):
    class Bar:
        def __init__(self):
            self.done, self.totals = 0, []

        def __call__(self, n=1):
            self.done += n

        def set_total(self, total):
            self.totals.append(total)

    bar = Bar()
    ckptaudit.inspect(inputs["run"], steps=range(0, 61, 20), file_check=False, progress=bar)
    assert bar.totals == [4] and bar.done == 4  # checkpoints 0, 20, 40, 60
    done = []
    ckptaudit.inspect(inputs["run"], steps=[10, 30], file_check=False, progress=done.append)  # a plain callable
    assert sum(done) == 2


def _trunk_vector(ckpt: Path, d: int = 32, n_layers: int = 2) -> np.ndarray:
    """The GPT-2 trunk (attention and MLP weights of every block, SPEC section 0) as one float64 vector, read with
    safetensors itself."""
    parts = []
    with safe_open(str(ckpt / "model.safetensors"), framework="np") as f:
        for layer in range(n_layers):
            p = f"transformer.h.{layer}."
            for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
                parts.append(f.get_tensor(p + name).astype(np.float64).ravel())
    return np.concatenate(parts)


def test_backbone_rho_is_numpys_svd_of_the_drift(inputs, results):
    doc = _result("backbone", inputs, results).to_json()
    assert doc["steps"] == [40, 50, 60] and doc["anchor_step"] == 0
    base = _trunk_vector(_ckpt(inputs, 0))
    X = np.stack([_trunk_vector(_ckpt(inputs, s)) - base for s in (40, 50, 60)])
    s2 = np.linalg.svd(X, compute_uv=False) ** 2
    np.testing.assert_allclose(doc["trunk"]["rho"], s2 / s2.sum(), rtol=1e-6, atol=1e-12)


def test_fisher_directions_live_in_the_trunk_of_the_vectors_file(inputs, results, tmp_path):
    vectors = tmp_path / "v.safetensors"
    ckptaudit.backbone(inputs["run"], save_vectors=vectors, device="cpu")
    doc = ckptaudit.fisher(_ckpt(inputs, 60), vectors=vectors, batches=2, batch_size=8, n_random=1,
                           device="cpu").to_json()
    assert doc["dim"] == _trunk_vector(_ckpt(inputs, 60)).size
    # the same directions from the run itself (no --vectors) give the same dimension and quotients' keys
    auto = _result("fisher", inputs, results).to_json()
    assert auto["dim"] == doc["dim"] and list(auto["checkpoints"][0]["q"]) == list(doc["checkpoints"][0]["q"])


def test_resume_probe_start_weights_hash_is_the_files(inputs, results):
    import torch

    doc = _result("resume_probe", inputs, results).to_json()
    h = hashlib.sha256()
    with safe_open(str(_ckpt(inputs, 60) / "model.safetensors"), framework="pt") as f:
        for name in sorted(f.keys()):
            h.update(f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes())
    assert doc["start_weights_sha256"] == h.hexdigest()
    assert [(c["name"], c["start_sha256"]) for c in doc["conditions"]] == [("control", h.hexdigest()),
                                                                          ("reset", h.hexdigest())]


def test_classify_embeddings_mean_c2_is_the_brute_force_mean_over_all_pairs(inputs, results):
    doc = _result("classify_embeddings", inputs, results).to_json()
    with safe_open(str(inputs["lm"] / "model.safetensors"), framework="np") as f:
        E = f.get_tensor("transformer.wte.weight").astype(np.float64)
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    C = U @ U.T
    iu = np.triu_indices(len(U), k=1)
    c2 = C[iu] ** 2
    assert (doc["vocab_size"], doc["dim"], doc["pairs"]) == (E.shape[0], E.shape[1], len(c2))
    np.testing.assert_allclose(doc["mean_c2"], c2.mean(), rtol=1e-6)
    np.testing.assert_allclose(doc["frac_abs_c_gt_0_3"], np.mean(np.abs(C[iu]) > 0.3), rtol=1e-9)


def test_born_gap_logit_gap_is_the_models_own_logits(inputs, results):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    doc = _result("born_gap", inputs, results).to_json()
    (ctx,) = doc["contexts"]
    tok = AutoTokenizer.from_pretrained(inputs["lm"])
    model = GPT2LMHeadModel.from_pretrained(inputs["lm"]).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tok("the old man felt a deep")["input_ids"]])).logits[0, -1].double()
    target, competitor = WORDS.index("longing"), WORDS.index("yearning")
    np.testing.assert_allclose(ctx["logit_gap"], float(logits[target] - logits[competitor]), rtol=1e-5, atol=1e-6)


def test_regimes_labels_follow_the_fixed_thresholds(inputs, results):
    doc = _result("regimes", inputs, results).to_json()
    low, high = 0.9, 0.999
    assert doc["steps"] == [30, 40, 50, 60]
    s = doc["similarity"][1:]  # s_t needs a previous checkpoint: none at the first
    want = ["stable" if v > high else "chaotic" if v < low else "transition" for v in s]
    assert doc["regime"] == ["unknown", *want]


def test_extrapolate_linear_weight_error_from_the_stored_tensors(inputs, results):
    doc = _result("extrapolate", inputs, results).to_json()

    def theta(step):
        with safe_open(str(_ckpt(inputs, step) / "model.safetensors"), framework="np") as f:
            return {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}

    t40, t50, t60 = theta(40), theta(50), theta(60)
    # linear from step 50 with K = 10 (one saved interval): theta_hat = theta50 + (theta50 - theta40)
    err = sum(float((((2 * t50[k] - t40[k]) - t60[k]) ** 2).sum()) for k in t60)
    move = sum(float(((t60[k] - t50[k]) ** 2).sum()) for k in t60)
    (row,) = [r for r in doc["results"] if r["step"] == 50 and r["K"] == 10 and r["predictor"] == "linear"]
    np.testing.assert_allclose(row["rel_weight_error"], np.sqrt(err / move), rtol=1e-5)


def test_cross_seed_of_a_run_and_its_copy_agrees_exactly(inputs, results):
    doc = _result("cross_seed", inputs, results).to_json()
    losses = [s["final_loss"] for s in doc["seeds"]]
    assert losses[0] == losses[1] and doc["loss_cv"] == 0.0
    assert doc["regime_agreement"] == 1.0 and doc["matched_steps"] == [50, 60]
    np.testing.assert_allclose(doc["cka"]["mean"], [1.0, 1.0], rtol=1e-6)


def test_gate_fails_on_a_planted_nan_without_raising(inputs, results, tmp_path):
    from safetensors.numpy import save_file

    assert _result("run_gate", inputs, results).passed is True
    ckpt = tmp_path / "checkpoint-60"
    shutil.copytree(_ckpt(inputs, 60), ckpt)
    with safe_open(str(ckpt / "model.safetensors"), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    doc = ckptaudit.run_gate(ckpt, inputs["policy"], device="cpu").to_json()
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert doc["passed"] is False and status["finite"] == "fail" and status["provenance"] == "pass"


# ------------------------------------------------------------------------------------- defaults, errors, import, README

COMMAND_OF = {"inspect": "inspect", "backbone": "backbone", "fisher": "fisher", "resume_probe": "resume-probe",
              "classify_embeddings": "classify-embeddings", "born_gap": "born-gap", "regimes": "regimes",
              "extrapolate": "extrapolate", "cross_seed": "cross-seed", "run_gate": "gate"}
# command parameter -> (API keyword, whether the flag is the keyword's negation), where the names differ
RENAMED = {"no_file_check": ("file_check", True), "lr_mult": ("lr_mults", False), "no_boundary": ("boundary_probe", True),
           "no_loss": ("loss", True), "predictor": ("predictors", False), "k": ("K", False),
           "cascade": ("cascades", False)}
RENAMED_IN = {("backbone", "switch"): "switches", ("fisher", "run"): "backbone_run", ("resume_probe", "steps"): "train_steps"}
OUTPUT_ONLY = {"out", "no_report", "no_hash", "json_out", "quiet", "plot", "init", "force", "json_path", "junit", "sarif"}


@pytest.mark.parametrize("function", list(COMMAND_OF))
def test_every_option_is_a_keyword_with_the_commands_default(function):
    import inspect as pyinspect

    import typer.main

    import ckptaudit.cli.commands  # noqa: F401 - registers every command
    from ckptaudit.cli.app import app

    command = typer.main.get_command(app).commands[COMMAND_OF[function]]
    sig = pyinspect.signature(getattr(ckptaudit.api, function)).parameters
    for p in command.params:
        if p.name in OUTPUT_ONLY or type(p).__name__.endswith("Argument"):
            continue
        name, negated = RENAMED.get(p.name, (p.name, False))
        name = RENAMED_IN.get((function, p.name), name)
        assert name in sig, f"{COMMAND_OF[function]} {p.opts[0]} has no keyword in ckptaudit.{function}"
        got = sig[name].default
        if got is sig[name].empty:  # a required option (born-gap --contexts, gate --policy, which the command checks itself) is positional here
            assert p.required or p.default is None, p.opts[0]
            continue
        want = (not p.default) if negated else p.default
        assert got == want or (want is None and got == ()), (p.opts[0], got, want)




@pytest.mark.parametrize("call,args", [
    (lambda p: ckptaudit.inspect(p / "no-such-run"), lambda p: ["inspect", p / "no-such-run"]),
    (lambda p: ckptaudit.backbone(p / "no-such-run", device="cpu"), lambda p: ["backbone", p / "no-such-run", "--device", "cpu"]),
    (lambda p: ckptaudit.resume_probe(p / "no-such-ckpt", device="cpu"), lambda p: ["resume-probe", p / "no-such-ckpt", "--device", "cpu"]),
    (lambda p: ckptaudit.backbone(p, blocks="3-1", device="cpu"), lambda p: ["backbone", p, "--blocks", "3-1", "--device", "cpu"]),
])
def test_errors_are_the_commands(call, args, tiny_run, tmp_path, capsys):
    base = tiny_run if "blocks" in repr(args(tmp_path)) else tmp_path
    with pytest.raises(CkptAuditError) as exc:
        call(base)
    assert capsys.readouterr().err == ""
    r = invoke(*args(base))
    assert r.exit_code == exc.value.exit_code == 2
    assert r.stderr.strip() == f"ckptaudit: error: {exc.value}"


def test_import_ckptaudit_does_not_import_torch():
    code = ("import sys, ckptaudit; assert 'inspect' in dir(ckptaudit); "
            "print(sorted(m for m in ('torch', 'transformers', 'h5py', 'typer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert ckptaudit.backbone is ckptaudit.api.backbone
    with pytest.raises(AttributeError):
        ckptaudit.no_such_function  # noqa: B018


def readme_example() -> str:
    """The ```python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_on_the_tiny_run(tiny_run, capsys):
    code = readme_example()
    assert 'run = "fixtures/runs/demo"' in code
    namespace: dict = {}
    exec(compile(code.replace('"fixtures/runs/demo"', repr(str(tiny_run))), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    bb = namespace["bb"].to_json()
    assert namespace["a"] == dict(zip(bb["steps"], bb["trunk"]["a"], strict=True))
    assert "Level-2 sensitive" in out and namespace["rp"]["checkpoint"]


def test_notebook_cells_are_the_readme_example():
    nb = json.loads((REPO / "examples" / "api_notebook.ipynb").read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in nb["cells"] if c["cell_type"] == "code")
    assert "\n\n".join(cells) + "\n" == readme_example()
