"""The model-running commands on a real transformers.Trainer language-model run (SmolLM2's 49,152-token vocabulary,
fixtures/trainer_lm.py): one --data file for every command, seeded window selection identical across processes,
the eval cap stated, CONTROL = the Trainer's own resume (equal to the run's own later checkpoint), CONTROL in
ckptaudit's loop with the run's batch size, schedule and RNG state, cross-seed's loss from trainer_state.json,
the run's hyper-parameters in inspect, and the precision in the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke
from conftest import CORPUS, REPO_ROOT
from safetensors.torch import load_file

from ckptaudit.analyses.resume.conditions import probe_inputs_from_checkpoint
from ckptaudit.analyses.resume.run import ConditionSpec, ResumeSettings, run_condition

CONTROL = ConditionSpec("control", "preserved", 1.0, 0, "saved")
RESET = ConditionSpec("reset", "reset", 1.0, 0, "constant")


def _rel_diff(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> float:
    num = sum(float((p.detach().double() - saved[n].double()).norm() ** 2) for n, p in model.named_parameters())
    den = sum(float(saved[n].double().norm() ** 2) for n, _ in model.named_parameters())
    return math.sqrt(num / den)


def _run(trainer_lm: Path, seed: int = 0) -> Path:
    return trainer_lm / f"seed{seed}" / "run"


def _json(*args, device: bool = True) -> dict:
    r = invoke(*args, "--json", "--no-report", *(["--device", "cpu"] if device else []))
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ------------------------------------------------------------------------------------------ CONTROL is the run


@pytest.mark.slow
def test_trainer_control_reproduces_the_runs_next_checkpoint_reset_does_not(trainer_lm):
    """CONTROL through Trainer.train(resume_from_checkpoint=checkpoint-20) for 5 steps lands on the run's own
    checkpoint-25 (dropout on: the Trainer restores rng_state.pth; its random sampler skips the 20 batches seen);
    a fresh optimizer does not."""
    run = _run(trainer_lm)
    inputs = probe_inputs_from_checkpoint(run / "checkpoint-20", data=CORPUS,
                                          train_data=trainer_lm / "seed0" / "data" / "train.jsonl")
    assert inputs.control_mode == "Trainer resume" and inputs.start_step == 20
    target = load_file(run / "checkpoint-25" / "model.safetensors")
    settings = ResumeSettings(steps=5, eval_every=5)
    control, model = run_condition(CONTROL, inputs, settings)
    assert _rel_diff(model, target) < 1e-4
    assert control.steps == (0, 5) and len(control.train_loss) == 5
    reset, reset_model = run_condition(RESET, inputs, settings)
    assert _rel_diff(reset_model, target) > 1e-3
    assert reset.start_sha256 == control.start_sha256


@pytest.mark.slow
def test_resume_probe_with_its_defaults_finishes_and_says_how_control_was_made(trainer_lm):
    """The whole default probe (6 conditions) from checkpoint-25 on CPU: the run's max_steps (30) cuts the 50 default
    steps to 5, and the report lists where every value came from."""
    run = _run(trainer_lm)
    doc = _json("resume-probe", run / "checkpoint-25", "--data", CORPUS,
                "--train-data", trainer_lm / "seed0" / "data" / "train.jsonl")
    names = [c["name"] for c in doc["conditions"]]
    assert names == ["control", "reset", "reset_lr0.1", "reset_lr0.01", "reset_warmup10", "warmup_boundary"]
    st = doc["settings"]
    assert st["control"] == "Trainer resume" and st["steps"] == 5
    assert any("cut to 5" in n for n in doc["notes"])
    assert st["run_values"]["batch_size"] == {"value": 4, "source": "trainer_state.json train_batch_size x "
                                              "training_args.bin gradient_accumulation_steps"}
    assert st["run_values"]["schedule"]["value"] == "cosine"
    assert st["run_values"]["rng_state"]["value"] == "restored"
    assert st["precision"] == {"dtype": "float32", "checkpoint_dtype": "float32", "source": "float32 on CPU"}
    assert st["timing_seconds"]["total"] < 600


@pytest.mark.slow
def test_ckptaudit_loop_takes_batch_size_schedule_and_rng_from_the_checkpoint(trainer_lm):
    """Without the training set, CONTROL runs ckptaudit's loop with the run's batch size (trainer_state.json), its
    cosine schedule rebuilt from training_args.bin with scheduler.pt loaded, and rng_state.pth: the lr of every
    resumed step equals what the Trainer itself logged (trainer_state.json, logging_steps=1)."""
    run = _run(trainer_lm)
    inputs = probe_inputs_from_checkpoint(run / "checkpoint-10", data=CORPUS)
    assert inputs.control_mode == "ckptaudit loop" and inputs.rng_state is not None
    v = inputs.run_values
    assert v["batch_size"]["value"] == 4 and v["batch_size"]["source"].startswith("trainer_state.json")
    assert (v["schedule"], v["warmup_steps"]["value"], v["max_steps"]["value"]) == (
        {"value": "cosine", "source": "training_args.bin"}, 5, 30)
    assert "data order" in " ".join(inputs.notes) or "data_order" in v
    control, _ = run_condition(CONTROL, inputs, ResumeSettings(steps=5, eval_every=5))
    logged = {e["step"]: e["learning_rate"] for e in
              json.loads((run / "checkpoint-30" / "trainer_state.json").read_text())["log_history"] if "learning_rate" in e}
    # The Trainer logs at step s (1-based) the lr that step s was taken with; resumed step k is global step 10 + k + 1.
    assert list(control.lr) == pytest.approx([logged[10 + k + 1] for k in range(5)], rel=1e-6)
    override = probe_inputs_from_checkpoint(run / "checkpoint-10", data=CORPUS, batch_size=3)
    assert override.run_values["batch_size"] == {"value": 3, "source": "--batch-size"}


def test_extrapolate_times_real_training_steps_on_a_trainer_checkpoint(trainer_lm):
    """--time on a transformers.Trainer run trains from its last checkpoint in resume-probe's loop: the run's batch
    size (trainer_state.json, read here), its optimizer state (AdamW's own step counter advances by max(K) plus the
    untimed warm-up step), cumulative seconds that grow with K, and no note that timing was impossible."""
    run = _run(trainer_lm)
    s = _json("extrapolate", run, "--data", CORPUS, "--K", "2,5", "--predictor", "linear", "--steps", "25:30", "--time")
    t = s["timing"]
    state = json.loads((run / "checkpoint-30" / "trainer_state.json").read_text())
    assert t["from_step"] == 30 and t["batch_size"] == state["train_batch_size"]
    assert t["batch_size_source"].startswith("trainer_state.json") and "optimizer state" in t["loop"]
    assert t["optimizer_steps"] == 5 + 1
    assert 0 < t["train_seconds"]["2"] < t["train_seconds"]["5"]
    assert set(t["ratio"]["linear"]) == {"2", "5"}
    assert not [n for n in s["notes"] if n.startswith("--time")]


# ------------------------------------------------------------------------------------------ one --data


@pytest.mark.slow
def test_every_command_reads_the_same_text_file(trainer_lm):
    """fixtures/data/corpus.txt, tokenised with the run's own tokenizer, is accepted by every command that takes
    --data, and each evaluates the same validation windows (same count, same SHA-256 of the token ids)."""
    run0, run1 = _run(trainer_lm, 0), _run(trainer_lm, 1)
    docs = {
        "resume-probe": _json("resume-probe", run0 / "checkpoint-30", "--data", CORPUS, "--train-steps", 1,
                              "--preserve-optimizer")["settings"]["eval_data"],
        "extrapolate": _json("extrapolate", run0, "--data", CORPUS, "--K", 5, "--predictor", "linear",
                             "--steps", "25:30")["eval_data"],
        "cross-seed": _json("cross-seed", run0, run1, "--data", CORPUS, "--steps", "25:30")["eval_data"],
        "gxs transplant": _json("gxs", "transplant", run0 / "checkpoint-30", run1 / "checkpoint-30", "--data",
                                CORPUS, "--heads", "0.0")["eval_data"],
        "gxs slack": _json("gxs", "slack", run0 / "checkpoint-30", "--data", CORPUS, "--alpha", "1",
                           "--sigma", "0,1")["eval_data"],
    }
    fisher = _json("fisher", run0, "--data", CORPUS, "--batches", 2, "--batch-size", 2, "--random", 2,
                   "--steps", "30")["settings"]["data"]["selection"]
    docs["fisher"] = fisher
    for name, sel in docs.items():
        assert sel["kind"] == "text" and sel["seq_len"] == 64 and sel["documents"] == 1, name
    shas = {name: sel["validation"]["sha256"] for name, sel in docs.items()}
    assert len(set(shas.values())) == 1, shas
    assert docs["fisher"]["train"]["windows_used"] == docs["gxs slack"]["train"]["windows_used"]


def test_window_selection_is_identical_across_processes_and_reruns(tmp_path):
    """The capped selection is a function of the file, the options and the seed: two processes with different hash
    seeds pick the same windows; another seed picks others."""
    code = ("import json, sys; from ckptaudit.io.discover import discover_run; "
            "from ckptaudit.tasks.data import WindowSpec, load_data; "
            "c = discover_run(sys.argv[1]).checkpoints[-1]; "
            "d = load_data(c, data=sys.argv[2], windows=WindowSpec(seq_len=8, eval_tokens=200, seed=int(sys.argv[3]))); "
            "print(json.dumps(d.selection()))")
    ids = tmp_path / "ids.npy"
    import numpy as np

    np.save(ids, np.random.default_rng(0).integers(0, 20, 8 * 500))
    from conftest import make_tiny_lm_dir

    model = make_tiny_lm_dir(tmp_path / "m", {f"w{i}": i for i in range(20)} | {"[UNK]": 20}, unk="[UNK]", n_embd=8,
                             n_layer=1, n_head=2)
    outs = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        r = subprocess.run([sys.executable, "-c", code, str(model), str(ids), "3"], capture_output=True,
                           text=True, env=env, cwd=REPO_ROOT, check=True)
        outs.append(json.loads(r.stdout))
    assert outs[0] == outs[1]
    from ckptaudit.io.discover import discover_run
    from ckptaudit.tasks.data import WindowSpec, load_data

    ckpt = discover_run(model).checkpoints[-1]
    assert load_data(ckpt, data=ids, windows=WindowSpec(seq_len=8, eval_tokens=200, seed=3)).selection() == outs[0]
    other = load_data(ckpt, data=ids, windows=WindowSpec(seq_len=8, eval_tokens=200, seed=4)).selection()
    assert other["validation"]["windows"] != outs[0]["validation"]["windows"]
    assert outs[0]["validation"]["windows_used"] == 25 and outs[0]["validation"]["capped"]


def test_eval_cap_changes_the_windows_and_the_report_says_so(trainer_lm):
    ckpt = _run(trainer_lm) / "checkpoint-30"
    full = _json("gxs", "slack", ckpt, "--data", CORPUS, "--alpha", "1", "--sigma", "0")
    capped = _json("gxs", "slack", ckpt, "--data", CORPUS, "--alpha", "1", "--sigma", "0", "--eval-tokens", 200)
    f, c = full["eval_data"]["validation"], capped["eval_data"]["validation"]
    assert not f["capped"] and c["capped"] and c["token_cap"] == 200
    assert c["windows_used"] == 3 < f["windows_used"] == f["windows_in_split"]
    assert capped["n"] == 3 * 63 < full["n"]
    r = invoke("gxs", "slack", ckpt, "--data", CORPUS, "--alpha", "1", "--sigma", "0", "--eval-tokens", 200,
               "--no-report", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert f"3 of {f['windows_in_split']} validation windows" in r.stdout and "capped at 200 tokens" in r.stdout


# ------------------------------------------------------------------------------------------ run records


def test_cross_seed_loss_cv_from_recorded_eval_loss_without_data(trainer_lm):
    """Without --data, the final loss of each run is the last eval_loss its Trainer logged, and the report says so."""
    doc = _json("cross-seed", _run(trainer_lm, 0), _run(trainer_lm, 1), "--steps", "25:30")
    losses = []
    for seed in (0, 1):
        state = json.loads((_run(trainer_lm, seed) / "checkpoint-30" / "trainer_state.json").read_text())
        losses.append([e["eval_loss"] for e in state["log_history"] if "eval_loss" in e][-1])
    mean = sum(losses) / 2
    cv = math.sqrt(sum((x - mean) ** 2 for x in losses) / 2) / mean
    assert doc["loss_cv"] == pytest.approx(cv, rel=1e-12)
    assert [s["final_loss"] for s in doc["seeds"]] == losses
    assert all(s["final_loss_source"] == "eval_loss recorded in trainer_state.json at step 30" for s in doc["seeds"])
    assert any("trainer_state.json" in n and "--data" in n for n in doc["notes"])


def test_inspect_shows_the_runs_hyperparameters_and_their_files(trainer_lm):
    """The values the producer gave TrainingArguments (fixtures/make_fixtures.py _TRAINER_LM), read from
    training_args.bin as plain data, and the Trainer's own counts from trainer_state.json."""
    doc = _json("inspect", _run(trainer_lm), "--no-hash", device=False)
    hp = doc["hyperparameters"]
    assert hp["learning_rate"] == {"value": 3e-3, "source": "training_args.bin"}
    assert hp["lr_scheduler_type"] == {"value": "cosine", "source": "training_args.bin"}
    assert hp["warmup_steps"]["value"] == 5 and hp["weight_decay"]["value"] == 0.01
    assert hp["per_device_train_batch_size"] == {"value": 4, "source": "training_args.bin"}
    assert hp["train_batch_size"] == {"value": 4, "source": "trainer_state.json"}
    assert hp["max_steps"] == {"value": 30, "source": "trainer_state.json"} and doc["hyperparameters_step"] == 30
    r = invoke("inspect", _run(trainer_lm), "--no-hash", "--no-report")
    assert "training hyper-parameters" in r.stdout and "training_args.bin" in r.stdout


def test_inspect_states_the_training_args_rule_once_as_the_gate_applies_it(trainer_lm, tmp_path):
    """Every Trainer checkpoint holds training_args.bin: inspect says so in one line for the run (not once per
    checkpoint), names it exempt as the default gate policy does, and the gate with that policy passes the file."""
    run = _run(trainer_lm)
    n_ckpts = len(list(run.glob("checkpoint-*/training_args.bin")))
    assert n_ckpts > 1
    r = invoke("inspect", run, "--no-hash")
    text = " ".join(r.stdout.split())  # the console wraps long lines
    assert text.count("training_args.bin in") == 1 and f"training_args.bin in {n_ckpts} checkpoints" in text, text
    note = text.split(f"training_args.bin in {n_ckpts} checkpoints")[1].split("provenance")[0]
    assert "the default gate policy exempts it" in note and "unsafe file" not in text
    assert r.stdout.count("yes (1 exempt)") == n_ckpts
    policy = tmp_path / "policy.toml"
    assert invoke("gate", "--init", policy).exit_code == 0
    import tomllib

    from ckptaudit.io.safety import DEFAULT_EXEMPT_FILES

    assert tomllib.loads(policy.read_text())["checks"]["safe_serialization"]["allow_files"] == list(DEFAULT_EXEMPT_FILES)
    exempt = tomllib.loads(policy.read_text())["checks"]["safe_serialization"]["allow_files"]
    policy.write_text(f"[checks.safe_serialization]\nallow_files = {json.dumps(exempt)}\n")
    g = invoke("gate", run, "--policy", policy, "--junit", tmp_path / "g.xml")
    assert g.exit_code == 0, g.output
    assert "exempted by allow_files: training_args.bin" in (tmp_path / "g.xml").read_text()


def test_precision_default_override_and_report(tmp_path):
    """A bfloat16 checkpoint runs in float32 on the CPU by default and the report says both; --dtype overrides."""
    from conftest import make_tiny_lm_dir
    from transformers import GPT2LMHeadModel

    vocab = {f"w{i}": i for i in range(20)} | {"[UNK]": 20}
    d = make_tiny_lm_dir(tmp_path / "m", vocab, unk="[UNK]", n_embd=8, n_layer=1, n_head=2)
    GPT2LMHeadModel.from_pretrained(d).to(torch.bfloat16).save_pretrained(d)
    (tmp_path / "t.txt").write_text(" ".join(f"w{i % 20}" for i in range(400)))
    base = ("gxs", "slack", d, "--data", tmp_path / "t.txt", "--alpha", "1", "--sigma", "0")
    doc = _json(*base)
    assert doc["precision"] == {"dtype": "float32", "checkpoint_dtype": "bfloat16", "source": "float32 on CPU"}
    doc = _json(*base, "--dtype", "bfloat16")
    assert doc["precision"]["dtype"] == "bfloat16" and doc["precision"]["source"] == "--dtype"
    r = invoke(*base, "--dtype", "fp8", "--no-report", "--device", "cpu")
    assert r.exit_code == 2 and "--dtype fp8" in r.stderr


def test_datasets_folder_and_parquet_give_the_text_file_windows(tmp_path, trainer_lm):
    """A datasets folder (save_to_disk) and a parquet file with a text column hold the same documents as JSONL."""
    datasets = pytest.importorskip("datasets")  # a dev dependency; optional for users
    from ckptaudit.io.discover import discover_run
    from ckptaudit.tasks.data import load_data

    ckpt = discover_run(_run(trainer_lm) / "checkpoint-30").checkpoints[0]
    texts = [p for p in CORPUS.read_text().split("\n\n") if p.strip()][:40]
    ds = datasets.Dataset.from_dict({"text": texts})
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "t.parquet"))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sels = [load_data(ckpt, data=tmp_path / n).selection() for n in ("ds", "t.parquet", "t.jsonl")]
    assert [s["kind"] for s in sels] == ["datasets", "parquet", "jsonl-text"]
    for s in sels[:2]:
        assert s["documents"] == 40 and s["validation"]["sha256"] == sels[2]["validation"]["sha256"]
        assert s["train"]["sha256"] == sels[2]["train"]["sha256"]
