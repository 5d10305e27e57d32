"""A tied head stored twice in a pickle (one storage under two names) is one tensor: counted once, said so."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cli_helpers import invoke
from conftest import tiny_gpt2_config

from ckptaudit.io.discover import discover_run
from ckptaudit.io.models import load_model


def _model_dirs(tmp_path: Path):
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_gpt2_config())
    pickled, safe = tmp_path / "bin", tmp_path / "safe"
    model.save_pretrained(safe)  # safetensors: the tied head is not stored
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the head is stored under both names
    return model, pickled, safe


def test_tied_head_in_a_pickle_is_counted_once(tmp_path: Path):
    model, pickled, safe = _model_dirs(tmp_path)
    assert "lm_head.weight" in torch.load(pickled / "pytorch_model.bin", weights_only=True)
    want = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    counts = {}
    for d in (pickled, safe):
        r = invoke("inspect", d, "--json", "--no-report", "--no-hash")
        assert r.exit_code == 0, r.output
        counts[d.name] = json.loads(r.stdout)["checkpoints"][0]
    assert counts["bin"]["n_params"] == counts["safe"]["n_params"] == want
    assert counts["bin"]["shared_tensors"] == {"lm_head.weight": "transformer.wte.weight"}
    assert counts["safe"]["shared_tensors"] == {}
    human = invoke("inspect", pickled, "--no-report", "--no-hash")
    assert "counted once: lm_head.weight = transformer.wte.weight" in " ".join(human.stdout.split())


def test_model_from_the_pickle_equals_the_original(tmp_path: Path):
    model, pickled, _ = _model_dirs(tmp_path)
    loaded = load_model(discover_run(pickled).checkpoints[0])
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
