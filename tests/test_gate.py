"""`ckptaudit gate`: each check passing on the fixture run and failing on copies made to fail; policy errors;
JUnit / SARIF / JSON outputs parsed back with standard parsers; exit codes through typer's CliRunner."""

from __future__ import annotations

import json
import pickle
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import MINIMAL_POLICY, assert_one_line_error
from cli_helpers import invoke as cli_invoke
from safetensors.torch import load_file, save_file
from stack_helpers import rho_reference

from ckptaudit.gate.policy import default_policy_text, parse_policy

BASE = MINIMAL_POLICY


def invoke(*args):
    return cli_invoke(*args, reraise=True)


def gate(run: Path, policy_text: str, tmp_path: Path, *extra):
    """Run the gate with JSON, JUnit and SARIF outputs; returns (result, json doc or None, junit path, sarif path)."""
    pol = tmp_path / "policy.toml"
    pol.write_text(policy_text)
    j, x, s = tmp_path / "gate.json", tmp_path / "gate.xml", tmp_path / "gate.sarif"
    for p in (j, x, s):
        p.unlink(missing_ok=True)
    r = invoke("gate", run, "--policy", pol, "--no-report", "--device", "cpu", "--json-out", j, "--junit", x, "--sarif", s, *extra)
    if r.exit_code == 1:
        assert_one_line_error(r, code=1)  # a failed gate says so on one line of stderr
    doc = json.loads(j.read_text()) if j.exists() else None
    return r, doc, x, s


def by_name(doc: dict) -> dict:
    return {c["name"]: c for c in doc["checks"]}


@pytest.fixture()
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (2.5 MB) that a test may damage."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest)
    return dest


# ----------------------------------------------------------------------------------------- passing run, --init


def test_init_policy_parses_and_gates_tiny_run(tiny_run, tmp_path):
    r = invoke("gate", "--init")
    assert r.exit_code == 0, r.output
    policy = parse_policy(r.stdout, "stdout")  # the template parses with the gate's own parser
    assert r.stdout == default_policy_text() and "#" in r.stdout
    assert set(policy.checks) == {"provenance", "safe_serialization", "finite"}

    target = tmp_path / "ckptaudit-policy.toml"
    assert invoke("gate", "--init", target).exit_code == 0 and target.read_text() == r.stdout
    again = invoke("gate", "--init", target)
    assert "already exists" in assert_one_line_error(again, code=2)
    assert invoke("gate", "--init", target, "--force").exit_code == 0

    res, doc, xml_path, sarif_path = gate(tiny_run, target.read_text(), tmp_path)
    assert res.exit_code == 0, res.output
    assert doc["passed"] is True and [c["status"] for c in doc["checks"]] == ["pass"] * 3
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "value", "threshold", "message", "file"}
    assert "gate passed" in res.stdout and "provenance" in res.stdout
    suite = ET.parse(xml_path).getroot().find("testsuite")
    assert suite.get("name") == "ckptaudit-gate" and len(suite.findall("testcase")) == 3
    assert not suite.findall("testcase/failure") and not suite.findall("testcase/skipped")
    log = json.loads(sarif_path.read_text())
    assert log["version"] == "2.1.0" and log["runs"][0]["results"] == []
    assert [r["id"] for r in log["runs"][0]["tool"]["driver"]["rules"]] == ["provenance", "safe_serialization", "finite"]


def test_json_to_stdout_replaces_the_table(tiny_run, tmp_path):
    """--json is a flag, as for every command: the document on stdout instead of the table; --json-out PATH writes
    the same document to a file (and `--json-out -` is --json)."""
    pol = tmp_path / "p.toml"
    pol.write_text(BASE)
    r = invoke("gate", tiny_run, "--policy", pol, "--no-report", "--json", "--json-out", tmp_path / "gate.json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["passed"] is True and len(doc["checks"]) == 3
    assert json.loads((tmp_path / "gate.json").read_text()) == doc
    dash = invoke("gate", tiny_run, "--policy", pol, "--no-report", "--json-out", "-")
    assert dash.exit_code == 0 and json.loads(dash.stdout) == doc
    table = invoke("gate", tiny_run, "--policy", pol, "--no-report", "--json-out", tmp_path / "only-file.json")
    assert table.exit_code == 0 and "gate passed" in table.stdout
    assert json.loads((tmp_path / "only-file.json").read_text()) == doc


# --------------------------------------------------------------------------------------------- provenance


def test_missing_optimizer_fails_provenance(run_copy, tmp_path):
    (run_copy / "checkpoint-60" / "optimizer.pt").unlink()
    r, doc, xml_path, sarif_path = gate(run_copy, BASE, tmp_path)
    err = assert_one_line_error(r, code=1)
    assert "1 of 3 checks failed: provenance" in err
    prov = by_name(doc)["provenance"]
    assert prov["status"] == "fail" and "missing optimizer" in prov["message"] and "step 60" in prov["message"]
    assert by_name(doc)["finite"]["status"] == "pass"  # moments absent is provenance's failure, not finite's
    assert doc["passed"] is False

    # JUnit parsed back: one testcase per check, one failure element, for provenance.
    root = ET.parse(xml_path).getroot()
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == ["provenance", "safe_serialization", "finite"]
    failures = [(c.get("name"), c.find("failure")) for c in cases if c.find("failure") is not None]
    assert len(failures) == 1 and failures[0][0] == "provenance" and "optimizer" in failures[0][1].get("message")
    assert root.find("testsuite").get("failures") == "1" and root.find("testsuite").get("tests") == "3"

    # SARIF 2.1.0 required fields; one error result located at a file of the failing checkpoint.
    log = json.loads(sarif_path.read_text())
    assert log["version"] == "2.1.0" and "$schema" in log and len(log["runs"]) == 1
    run = log["runs"][0]
    assert run["tool"]["driver"]["name"] == "ckptaudit" and run["tool"]["driver"]["version"]
    rule_ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert len(run["results"]) == 1
    res = run["results"][0]
    assert res["ruleId"] == "provenance" and res["ruleId"] in rule_ids and res["level"] == "error"
    assert "optimizer" in res["message"]["text"]
    uri = res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert "checkpoint-60" in uri


def test_target_all_gates_every_checkpoint(run_copy, tmp_path):
    (run_copy / "checkpoint-20" / "scheduler.pt").unlink()
    r, doc, _, _ = gate(run_copy, BASE, tmp_path)
    assert r.exit_code == 0, r.output  # target = "last": checkpoint-20 is not gated
    r, doc, _, _ = gate(run_copy, BASE.replace('target = "last"', 'target = "all"'), tmp_path)
    assert r.exit_code == 1
    assert "step 20: missing scheduler" in by_name(doc)["provenance"]["message"]


def test_weights_that_do_not_fit_the_optimizer_fail_provenance(run_copy, tmp_path):
    st = run_copy / "checkpoint-60" / "model.safetensors"
    weights = load_file(st)
    name = "transformer.wpe.weight"
    weights[name] = weights[name][:-1].clone()  # one position fewer than the optimizer's moments
    save_file(weights, st, metadata={"format": "pt"})
    r, doc, _, _ = gate(run_copy, BASE, tmp_path)
    assert "provenance" in assert_one_line_error(r, code=1)
    msg = by_name(doc)["provenance"]["message"]
    assert name in msg and "shape" in msg, msg


def test_optimizer_moments_of_wrong_shape_fail_provenance(run_copy, tmp_path):
    opt_path = run_copy / "checkpoint-60" / "optimizer.pt"
    sd = torch.load(opt_path, weights_only=True)
    index = next(i for i, e in sd["state"].items() if e["exp_avg"].ndim == 2)
    sd["state"][index]["exp_avg"] = sd["state"][index]["exp_avg"][:, :-1].clone()
    torch.save(sd, opt_path)
    r, doc, _, _ = gate(run_copy, BASE, tmp_path)
    assert r.exit_code == 1, r.output
    prov = by_name(doc)["provenance"]
    assert prov["status"] == "fail" and "exp_avg" in prov["message"] and "transformer." in prov["message"]
    assert prov["file"].endswith("optimizer.pt")


# ------------------------------------------------------------------------------------------------- finite


def test_nan_weight_fails_finite_naming_the_tensor(run_copy, tmp_path):
    st = run_copy / "checkpoint-60" / "model.safetensors"
    weights = load_file(st)
    name = "transformer.h.1.mlp.c_fc.weight"
    weights[name][0, 0] = float("nan")
    weights[name][1, 1] = float("inf")
    save_file(weights, st, metadata={"format": "pt"})
    r, doc, _, sarif_path = gate(run_copy, BASE, tmp_path)
    assert "finite" in assert_one_line_error(r, code=1)
    fin = by_name(doc)["finite"]
    assert fin["status"] == "fail" and fin["value"] == 1
    assert fin["message"].startswith(name) and "1 NaN and 1 Inf" in fin["message"]
    assert fin["file"].endswith("model.safetensors")
    result = json.loads(sarif_path.read_text())["runs"][0]["results"][0]
    assert result["ruleId"] == "finite" and name in result["message"]["text"]


def test_inf_moment_fails_finite_naming_the_parameter(run_copy, tmp_path):
    opt_path = run_copy / "checkpoint-60" / "optimizer.pt"
    sd = torch.load(opt_path, weights_only=True)
    sd["state"][0]["exp_avg_sq"].view(-1)[3] = float("inf")
    torch.save(sd, opt_path)
    r, doc, _, _ = gate(run_copy, BASE, tmp_path)
    assert r.exit_code == 1, r.output
    fin = by_name(doc)["finite"]
    # Index 0 of the Trainer's first (decay) group is the first decayed parameter: the token embedding.
    assert fin["message"].startswith("transformer.wte.weight.exp_avg_sq") and "1 Inf" in fin["message"], fin
    r, doc, _, _ = gate(run_copy, BASE.replace("[checks.finite]", "[checks.finite]\nmoments = false"), tmp_path)
    assert by_name(doc)["finite"]["status"] == "pass"


# ---------------------------------------------------------------------------------------- safe serialization


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): a pickle that would run code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_would_run_code_fails_without_running(run_copy, tmp_path):
    canary = tmp_path / "pwned.txt"
    ckpt = run_copy / "checkpoint-60"
    torch.save({"extra": _CreatesFile(str(canary))}, ckpt / "extra_state.pt")  # torch zip archive
    # A plain pickle under a neutral name: the format is found from the content, not the extension.
    (ckpt / "notes.dat").write_bytes(pickle.dumps(_CreatesFile(str(canary)), protocol=2))
    r, doc, _, sarif_path = gate(run_copy, BASE, tmp_path)
    assert "safe_serialization" in assert_one_line_error(r, code=1)
    assert not canary.exists(), "the pickle's code ran"
    safe = by_name(doc)["safe_serialization"]
    assert safe["status"] == "fail" and safe["value"] == 2
    assert "open" in safe["message"] and Path(safe["file"]).name in ("extra_state.pt", "notes.dat")
    uri = json.loads(sarif_path.read_text())["runs"][0]["results"][0]["locations"][0]["physicalLocation"][
        "artifactLocation"]["uri"]  # fmt: skip
    assert uri.endswith(("extra_state.pt", "notes.dat"))

    allow = BASE.replace('allow_files = ["training_args.bin"]', 'allow_files = ["training_args.bin", "extra_*.pt", "notes.*"]')
    r, doc, _, _ = gate(run_copy, allow, tmp_path)
    assert r.exit_code == 0, r.output
    assert "3 exempted" in by_name(doc)["safe_serialization"]["message"]
    assert not canary.exists()


def test_training_args_pickle_fails_unless_allowed(tiny_run, tmp_path):
    r, doc, _, _ = gate(tiny_run, BASE.replace('allow_files = ["training_args.bin"]', ""), tmp_path)
    assert r.exit_code == 1
    safe = by_name(doc)["safe_serialization"]
    assert safe["status"] == "fail" and safe["file"].endswith("training_args.bin")


# ---------------------------------------------------------------------------------------- skipped checks


def test_skipped_checks_never_pass(tiny_run, tmp_path):
    # One checkpoint is no trajectory: the Fisher anisotropy along its backbone cannot be measured.
    text = BASE + "\n[checks.fisher_anisotropy]\nmax = 100.0\n"
    r, doc, xml_path, sarif_path = gate(tiny_run / "checkpoint-60", text, tmp_path)
    assert r.exit_code == 0, r.output
    fisher = by_name(doc)["fisher_anisotropy"]
    assert fisher["status"] == "skipped" and ">= 3 checkpoints" in fisher["message"] and fisher["value"] is None
    assert doc["passed"] is True and "skipped" in r.stdout
    skipped = [c for c in ET.parse(xml_path).getroot().iter("testcase") if c.find("skipped") is not None]
    assert [c.get("name") for c in skipped] == ["fisher_anisotropy"]
    assert json.loads(sarif_path.read_text())["runs"][0]["results"] == []

    strict = text.replace('target = "last"', 'target = "last"\nfail_on_skipped = true')
    r, doc, _, _ = gate(tiny_run / "checkpoint-60", strict, tmp_path)
    err = assert_one_line_error(r, code=1)
    assert "skipped" in err and "fisher_anisotropy" in err and doc["passed"] is False


def _plant_lr(ckpt: Path, lr: float) -> None:
    """Set the learning rate saved in ``ckpt``'s optimizer and scheduler state (every group) to ``lr``."""
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for group in opt["param_groups"]:
        group["lr"] = lr
    torch.save(opt, ckpt / "optimizer.pt")
    sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
    sched["_last_lr"] = [lr] * len(sched["_last_lr"])
    torch.save(sched, ckpt / "scheduler.pt")


@pytest.mark.parametrize("planted_lr, mult, status", [
    (0.0, 0.5, "pass"),  # the tiny run ends at lr 0: a fresh optimizer cannot move the weights
    (2e3, 1e-9, "pass"),  # x1e-9: 2e-6 per step for 3 steps leaves the loss where it was
    (2e3, 0.5, "fail"),  # AdamW's first step moves every weight by ~lr = 1e3 (and decays it by 1 - lr * wd): a collapse
])
def test_resume_probe_runs_the_reset_condition(run_copy, tmp_path, planted_lr, mult, status):
    """The RESET condition at lr_multiplier x the lr saved in the checkpoint, judged on a planted learning rate."""
    ckpt = run_copy / "checkpoint-60"
    assert [g["lr"] for g in torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]] == [0.0, 0.0]
    _plant_lr(ckpt, planted_lr)
    text = BASE + f"\n[checks.resume_probe]\nlr_multiplier = {mult}\nsteps = 3\n"
    r, doc, _, _ = gate(run_copy, text, tmp_path, "--seed", "3")
    rp = by_name(doc)["resume_probe"]
    assert rp["threshold"] == {"verdict": "stable", "lr_mult": mult}, rp
    assert rp["status"] == status, rp
    assert r.exit_code == (0 if status == "pass" else 1)
    if status == "pass":
        assert rp["value"] == "stable", rp
    else:
        assert rp["value"] != "stable" and "collapses at step 1" in rp["message"], rp


@pytest.mark.parametrize("mult, status, code", [(0.01, "pass", 0), (300.0, "fail", 1)])
def test_resume_probe_real_verdicts(tiny_run, tmp_path, mult, status, code):
    """Real RESET probes from the middle of the tiny run (its lr is not yet decayed to 0): a tiny multiplier is
    stable, a 300x multiplier blows the loss up past the 2x collapse rule at the first eval."""
    text = BASE + f"\n[checks.resume_probe]\nlr_multiplier = {mult}\nsteps = 5\n"
    r, doc, _, _ = gate(tiny_run, text, tmp_path, "--steps", "30")
    assert r.exit_code == code, r.output
    rp = by_name(doc)["resume_probe"]
    assert rp["status"] == status, rp
    if status == "fail":
        assert "collapses at step 1" in rp["message"], rp


def test_resume_probe_without_reset_condition_is_skipped(tiny_run, tmp_path, monkeypatch):
    """A probe result with no RESET condition cannot be judged: skipped, never passed (no real probe yields
    this, so the analysis is replaced for this one case)."""
    import ckptaudit.analyses.resume.run as resume

    class _Empty:
        conditions = ()

    monkeypatch.setattr(resume, "run_resume_probe", lambda inputs, settings: _Empty())
    r, doc, _, _ = gate(tiny_run, BASE + "\n[checks.resume_probe]\nsteps = 1\n", tmp_path)
    rp = by_name(doc)["resume_probe"]
    assert r.exit_code == 0 and rp["status"] == "skipped" and "no RESET condition" in rp["message"], rp


def test_resume_probe_without_task_is_skipped(run_copy, tmp_path):
    (run_copy / "checkpoint-60" / "ckptaudit_task.json").unlink()  # the probe's data is then unknown
    r, doc, _, _ = gate(run_copy, BASE + "\n[checks.resume_probe]\nsteps = 1\n", tmp_path)
    rp = by_name(doc)["resume_probe"]
    assert r.exit_code == 0 and rp["status"] == "skipped" and "ckptaudit_task.json" in rp["message"], rp
    assert rp["value"] is None and doc["passed"] is True


# --------------------------------------------------------------------------------- analyses-based bounds


TRUNK_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _steps_dirs(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _trunk_rho_reference(run: Path) -> np.ndarray:
    """rho_k of the trunk drift matrix (rows theta(t) - theta(first)) stacked by hand from the safetensors files and
    decomposed by numpy's SVD."""
    dirs = _steps_dirs(run)
    first = load_file(dirs[0] / "model.safetensors")
    names = sorted(n for n in first if n.endswith(TRUNK_SUFFIXES))
    assert len(names) == 8  # 2 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj)
    return rho_reference([load_file(d / "model.safetensors") for d in dirs], names)


def test_backbone_bounds(tiny_run, tmp_path):
    rho = _trunk_rho_reference(tiny_run)
    rho1_ref, k95_ref = float(rho[0]), int(np.searchsorted(np.cumsum(rho), 0.95) + 1)
    assert k95_ref < len(rho)  # k95_min = k95 + 1 can fail
    r, doc, _, _ = gate(tiny_run, BASE + f"\n[checks.backbone]\nrho1_min = 0.0\nk95_min = {k95_ref}\nk95_max = {k95_ref}\n",
                        tmp_path)
    assert r.exit_code == 0, r.output
    bb = by_name(doc)["backbone"]
    assert bb["status"] == "pass" and bb["value"]["k95"] == k95_ref
    assert bb["value"]["rho1"] == pytest.approx(rho1_ref, rel=1e-6)
    for table, needle in ((f"rho1_max = {rho1_ref * 0.99}", "rho1"), (f"rho1_min = {rho1_ref * 1.01}", "rho1"),
                          (f"k95_min = {k95_ref + 1}", "k95"), *([(f"k95_max = {k95_ref - 1}", "k95")] * (k95_ref > 1))):
        r, doc, _, _ = gate(tiny_run, BASE + f"\n[checks.backbone]\n{table}\n", tmp_path)
        assert "backbone" in assert_one_line_error(r, code=1), table
        assert by_name(doc)["backbone"]["status"] == "fail" and needle in by_name(doc)["backbone"]["message"], table
    # One checkpoint is not a trajectory: skipped with the reason, never passed.
    r, doc, _, _ = gate(tiny_run / "checkpoint-60", BASE + "\n[checks.backbone]\nk95_max = 6\n", tmp_path)
    assert r.exit_code == 0, r.output
    bb = by_name(doc)["backbone"]
    assert bb["status"] == "skipped" and ">= 3 checkpoints" in bb["message"]


def _bulk_index_reference(weights: Path) -> float:
    """ks_exp - ks_gauss of s = c^2 over every unordered pair of normalised token-embedding rows (SPEC section 5),
    by scipy's kstest on the whole population: uniform ordered pairs i != j have the same distribution."""
    from scipy import stats

    E = load_file(weights)["transformer.wte.weight"].double().numpy()
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    c = (E @ E.T)[np.triu_indices(len(E), k=1)]
    s = c * c
    ks_gauss = stats.kstest(s, stats.norm(s.mean(), s.std()).cdf).statistic
    ks_exp = stats.kstest(s, stats.expon(0.0, s.mean()).cdf).statistic
    return float(ks_exp - ks_gauss)


def test_embedding_class(tiny_run, tmp_path):
    ref = _bulk_index_reference(tiny_run / "checkpoint-60" / "model.safetensors")
    # 20,000 pairs drawn from the 300 of a 25-token vocabulary: the sample's CDF lies within 0.014 of the population's
    # (DKW at 99.9%: sqrt(ln(2 / 0.001) / (2 * 20000))), so each KS distance moves by that plus the small shift of the
    # fitted mean and std, and their difference by at most ~0.035.
    tol = 0.035
    assert abs(ref) > tol, ref  # the class is then decided by the population, not by the sample
    expected, other = ("A", "B") if ref > 0 else ("B", "A")  # A: the Gaussian fits better (ks_gauss < ks_exp)
    table = "\n[checks.embedding_class]\npairs = 20000\n"
    r, doc, _, _ = gate(tiny_run, BASE + table + f'expected = "{expected}"\nbulk_index_min = {ref - tol}\n'
                        f"bulk_index_max = {ref + tol}\n", tmp_path)
    assert r.exit_code == 0, r.output
    emb = by_name(doc)["embedding_class"]
    assert emb["status"] == "pass" and emb["value"]["class"] == expected
    assert emb["value"]["bulk_index"] == pytest.approx(ref, abs=tol)
    r, doc, _, _ = gate(tiny_run, BASE + table + f'expected = "{other}"\n', tmp_path)
    assert r.exit_code == 1
    assert f"expected {other}" in by_name(doc)["embedding_class"]["message"]
    for bound in (f"bulk_index_min = {ref + 2 * tol}", f"bulk_index_max = {ref - 2 * tol}"):
        r, doc, _, _ = gate(tiny_run, BASE + table + bound + "\n", tmp_path)
        assert r.exit_code == 1 and "bulk_index" in by_name(doc)["embedding_class"]["message"], bound


# ------------------------------------------------------------------------------------------ bad policies


@pytest.mark.parametrize(
    "text, needles",
    [
        (BASE + "\n[checks.finite]\n", ["line"]),  # duplicate table: a TOML error with its position
        (BASE.replace("[checks.finite]", "[checks.finite]\nmoments = true\nweigths = true"), ["checks.finite.weigths", "line 11", "unknown key"]),
        (BASE.replace("[checks.provenance]", '[checks.provenance]\nrequire = "optimizer"'), ["checks.provenance.require", "line 5", "array"]),
        (BASE.replace('target = "last"', "target = 3"), ["gate.target", "line 2", "string"]),
        (BASE.replace('target = "last"', 'target = "first"'), ["gate.target", "line 2"]),
        (BASE.replace('target = "last"', "target = "), ["line 2", "invalid TOML"]),
        (BASE + "\n[checks.speed]\nenabled = true\n", ["checks.speed", "line 11", "unknown check"]),
        (BASE + "\n[checks.backbone]\nenabled = true\n", ["checks.backbone", "line 11", "no threshold"]),
        (BASE + "\n[checks.backbone]\nrho1_min = 0.9\nrho1_max = 0.5\n", ["checks.backbone.rho1_min", "line 12"]),
        ("[gate]\n", ["enables no checks"]),
        ("[checks]\nprovenance = { enabled = 1 }\n", ["checks.provenance.enabled", "line 2", "true or false"]),
    ],
)
def test_malformed_policy_exits_2_naming_key_and_line(tiny_run, tmp_path, text, needles):
    r, doc, xml_path, _ = gate(tiny_run, text, tmp_path)
    err = assert_one_line_error(r, code=2)
    for n in needles:
        assert n in err, (n, err)
    assert doc is None and not xml_path.exists()  # nothing ran


def test_usage_errors(tiny_run, tmp_path):
    assert "--policy" in assert_one_line_error(invoke("gate", tiny_run, "--no-report"), code=2)
    assert "not found" in assert_one_line_error(invoke("gate", tiny_run, "--policy", tmp_path / "none.toml"), code=2)
    pol = tmp_path / "p.toml"
    pol.write_text(BASE)
    assert_one_line_error(invoke("gate", tmp_path / "no-such-run", "--policy", pol, "--no-report"), code=2)


def test_hdf5_report_written_even_when_the_gate_fails(run_copy, tmp_path):
    import h5py

    (run_copy / "checkpoint-60" / "scheduler.pt").unlink()
    pol = tmp_path / "p.toml"
    pol.write_text(BASE)
    out = tmp_path / "gate.h5"
    r = invoke("gate", run_copy, "--policy", pol, "--out", out, "--no-hash", "--quiet")
    assert r.exit_code == 1 and r.stdout == ""
    with h5py.File(out) as f:
        assert f.attrs["command"] == "gate"
        g = f["gate"]
        assert bool(g.attrs["passed"]) is False
        names = [n.decode() if isinstance(n, bytes) else n for n in g["names"][()]]
        status = [s.decode() if isinstance(s, bytes) else s for s in g["status"][()]]
        assert dict(zip(names, status, strict=True)) == {"provenance": "fail", "safe_serialization": "pass", "finite": "pass"}


# ------------------------------------------------------------------------------------------------- docs


ROOT = Path(__file__).resolve().parents[1]


def test_policy_reference_documents_every_key():
    from ckptaudit.gate.checks import CHECKS
    from ckptaudit.gate.reference import render_into
    from ckptaudit.gate.registry import GATE_KEYS

    doc = (ROOT / "docs" / "gate.md").read_text()
    missing = [k for k in GATE_KEYS if f"`{k}`" not in doc]
    for check in CHECKS.values():
        if f"[checks.{check.name}]" not in doc:
            missing.append(check.name)
        missing += [f"{check.name}.{k}" for k in check.keys if k != "enabled" and f"`{k}`" not in doc]
    assert not missing, f"docs/gate.md lacks: {missing}"
    assert render_into(doc) == doc, "docs/gate.md's policy reference is stale: run `make man`"


def test_ci_examples_are_valid_yaml_and_run_the_gate():
    import yaml  # dev dependency
    gh = yaml.safe_load((ROOT / "docs" / "ci" / "github-actions.yml").read_text())
    steps = gh["jobs"]["gate"]["steps"]
    runs = " ".join(s.get("run", "") for s in steps)
    assert "ckptaudit gate checkpoints/ --policy ckptaudit-policy.toml" in runs and "--sarif gate.sarif" in runs
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("github/codeql-action/upload-sarif") for u in uses)
    assert any(u.startswith("actions/upload-artifact") for u in uses)
    gl = yaml.safe_load((ROOT / "docs" / "ci" / "gitlab-ci.yml").read_text())
    job = gl["ckptaudit-gate"]
    assert job["artifacts"]["reports"]["junit"] == "gate.xml"
    assert any("ckptaudit gate" in line and "--junit gate.xml" in line for line in job["script"])


def _trunk_flat(tensors: dict[str, torch.Tensor], n_layer: int = 2, d: int = 32) -> np.ndarray:
    """The trunk written out by hand in the order of SPEC section 0: per block the Q, K, V columns of c_attn, then
    attn c_proj, c_fc and mlp c_proj (float64)."""
    parts = []
    for b in range(n_layer):
        w = tensors[f"transformer.h.{b}.attn.c_attn.weight"]
        parts += [w[:, :d], w[:, d : 2 * d], w[:, 2 * d :]]
        parts += [tensors[f"transformer.h.{b}.{n}.weight"] for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return np.concatenate([p.detach().double().reshape(-1).numpy() for p in parts])


def _anisotropy_reference(run: Path, batches: int = 16, seed: int = 0) -> float:
    """alpha = q(v_b) / mean_k q(w_k) at the run's last checkpoint, brute force: v_b = PC1 of a numpy SVD of the
    hand-stacked trunk drift, the gradients by plain loss.backward() of the checkpoint loaded by transformers on the
    batches of its recorded task, q(v) = mean_i <g_i, v>^2 (SPEC section 2); w_k the seeded random unit vectors
    orthogonal to v_b (``random_directions``, tested on its own in test_fisher)."""
    from transformers import GPT2LMHeadModel

    from ckptaudit.analyses.fisher.directions import random_directions
    from ckptaudit.io.discover import discover_run
    from ckptaudit.tasks.data import load_data

    dirs = _steps_dirs(run)
    flats = [_trunk_flat(load_file(d / "model.safetensors")) for d in dirs]
    X = np.stack([f - flats[0] for f in flats[1:]])
    v_b = np.linalg.svd(X, full_matrices=False)[2][0]
    W = random_directions(torch.from_numpy(v_b), 10, seed).numpy()
    model = GPT2LMHeadModel.from_pretrained(dirs[-1]).eval()
    data = load_data(discover_run(dirs[-1]).checkpoints[0])
    batch_size = json.loads((dirs[-1] / "ckptaudit_task.json").read_text())["batch_size"]
    grads = []
    for i in range(batches):
        model.zero_grad()
        loss, _ = data.loss_and_accuracy(model, data.batch("train", i, batch_size, seed))
        loss.backward()
        grads.append(_trunk_flat({n: p.grad for n, p in model.named_parameters()}))
    G = np.stack(grads)
    q = lambda v: float(np.mean((G @ v) ** 2))  # noqa: E731
    return q(v_b) / float(np.mean([q(w) for w in W]))


@pytest.mark.slow
def test_fisher_anisotropy_check_against_a_brute_force_rayleigh_quotient(tiny_run, tmp_path):
    """The check measures alpha at the last checkpoint along the run's own backbone, M = 16 gradients."""
    alpha = _anisotropy_reference(tiny_run)
    text = BASE + f"\n[checks.fisher_anisotropy]\nmin = {alpha * 0.999}\nmax = {alpha * 1.001}\n"
    res, doc, _, _ = gate(tiny_run, text, tmp_path)
    fisher = by_name(doc)["fisher_anisotropy"]
    assert fisher["status"] == "pass", fisher
    assert fisher["value"] == pytest.approx(alpha, rel=1e-5)
    for bound in (f"max = {alpha * 0.99}", f"min = {alpha * 1.01}"):
        res, doc, _, _ = gate(tiny_run, BASE + f"\n[checks.fisher_anisotropy]\n{bound}\n", tmp_path)
        assert res.exit_code == 1 and by_name(doc)["fisher_anisotropy"]["status"] == "fail", bound


@pytest.mark.slow
def test_both_backbone_checks_share_one_backbone_pass_with_the_same_values(tiny_run, tmp_path, monkeypatch):
    """backbone + fisher_anisotropy together compute the backbone once and report what each reports alone; the
    gate's temporary vectors file is removed when the run ends."""
    import tempfile

    import ckptaudit.analyses.backbone.run as backbone

    calls = []
    real = backbone.run_backbone

    def counting(*args, **kwargs):
        calls.append(kwargs.get("save_vectors"))
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone, "run_backbone", counting)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bb_table = "\n[checks.backbone]\nrho1_min = 0.0\n"
    fi_table = "\n[checks.fisher_anisotropy]\nmin = 0.0\n"
    values = {}
    for label, text in (("bb", BASE + bb_table), ("fi", BASE + fi_table), ("both", BASE + fi_table + bb_table)):
        calls.clear()
        r, doc, _, _ = gate(tiny_run, text, tmp_path)
        assert r.exit_code == 0, r.output
        assert len(calls) == 1, (label, calls)
        assert (calls[0] is None) == (label == "bb")  # vectors written only when the Fisher check reads them
        assert list(scratch.iterdir()) == [], label
        values[label] = {n: c["value"] for n, c in by_name(doc).items() if n in ("backbone", "fisher_anisotropy")}
    assert values["both"] == {**values["bb"], **values["fi"]}, values


def test_non_finite_measured_value_fails():
    from ckptaudit.gate.analyses_checks import _bounds

    for value in (float("nan"), float("inf"), float("-inf")):
        for lo, hi in ((0.0, 1.0), (None, 1.0), (0.0, None)):
            assert "not finite" in _bounds(value, lo, hi), (value, lo, hi)
    assert _bounds(0.5, 0.0, 1.0) is None and "> max" in _bounds(2.0, None, 1.0)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_fisher_anisotropy_fails_the_gate(tiny_run, tmp_path, monkeypatch, alpha):
    """alpha is NaN when mean q(random) is 0: the check fails, saying so, and the JSON stays valid."""
    import ckptaudit.analyses.fisher.run as fisher

    monkeypatch.setattr(fisher, "fisher_anisotropy", lambda run, **kw: alpha)
    r, doc, xml_path, _ = gate(tiny_run, BASE + "\n[checks.fisher_anisotropy]\nmin = 0.0\nmax = 100.0\n", tmp_path)
    assert "fisher_anisotropy" in assert_one_line_error(r, code=1)
    fi = by_name(doc)["fisher_anisotropy"]
    assert fi["status"] == "fail" and "not finite" in fi["message"] and fi["value"] is None, fi
    json.loads((tmp_path / "gate.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_type_error_inside_an_analysis_is_not_skipped(tiny_run, tmp_path, monkeypatch):
    """A bug in an analysis surfaces instead of turning the check into "skipped"."""
    import ckptaudit.analyses.fisher.run as fisher

    def broken(run, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(fisher, "fisher_anisotropy", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        gate(tiny_run, BASE + "\n[checks.fisher_anisotropy]\nmax = 100.0\n", tmp_path)


# ------------------------------------------------------------------------------------ one declaration per check


@pytest.fixture()
def weight_norm_check():
    """The docs/architecture.md example: a check declared once, removed from the registry afterwards."""
    import math

    from ckptaudit.gate.registry import _CHECKS, Key, gate_check
    from ckptaudit.gate.result import FAIL, PASS, CheckResult

    @gate_check(
        "weight_norm",
        "The global L2 norm of the weights lies within the policy bounds.",
        {"max": Key("float", None, "Highest allowed L2 norm.", positive=True, optional=True, example=1e4)},
        needs_one_of=("max",),
        value="the L2 norm of the last gated checkpoint.",
        init_enabled=False,
    )
    def check_weight_norm(ctx, settings):
        with ctx.targets[-1].tensors() as src:
            norm = math.sqrt(sum(float(src.get(n).double().square().sum()) for n in src.keys()))
        status = FAIL if norm > settings["max"] else PASS
        return CheckResult("weight_norm", status, norm, {"max": settings["max"]}, f"L2 norm {norm:.6g}")

    try:
        yield check_weight_norm
    finally:
        _CHECKS.pop("weight_norm")


def test_one_declaration_reaches_parser_template_docs_and_outputs(weight_norm_check, tiny_run, tmp_path):
    from ckptaudit.gate.reference import policy_reference

    table = "\n[checks.weight_norm]\nmax = {}\n"
    assert parse_policy(BASE + table.format(1.0)).checks["weight_norm"] == {"max": 1.0}
    with pytest.raises(Exception, match=r"line 12: checks\.weight_norm\.max: must be > 0"):
        parse_policy(BASE + table.format(-1.0), "p.toml")
    with pytest.raises(Exception, match="no threshold set"):
        parse_policy(BASE + "\n[checks.weight_norm]\n")
    template = default_policy_text()
    assert "[checks.weight_norm]\n# The global L2 norm" in template and "# max = 10000.0" in template
    assert "weight_norm" not in parse_policy(template).checks  # listed, but off
    assert "### `[checks.weight_norm]`" in policy_reference() and "| `max` | float > 0 | — |" in policy_reference()

    # The norm the test computes from the file itself, with safetensors' own reader.
    weights = load_file(tiny_run / "checkpoint-60" / "model.safetensors")
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in weights.values())))
    r, doc, xml_path, sarif_path = gate(tiny_run, BASE + table.format(norm * 1.01), tmp_path)
    assert r.exit_code == 0, r.output
    assert abs(by_name(doc)["weight_norm"]["value"] - norm) <= 1e-9 * norm
    r, doc, xml_path, sarif_path = gate(tiny_run, BASE + table.format(norm * 0.99), tmp_path)
    assert "weight_norm" in assert_one_line_error(r, code=1)
    rules = {rule["id"]: rule for rule in json.loads(sarif_path.read_text())["runs"][0]["tool"]["driver"]["rules"]}
    assert rules["weight_norm"]["shortDescription"]["text"].startswith("The global L2 norm")
    assert [c.get("name") for c in ET.parse(xml_path).getroot().iter("testcase")][-1] == "weight_norm"
