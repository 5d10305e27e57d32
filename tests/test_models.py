"""ckptaudit.io.models: models rebuilt from saved checkpoints, meta-device parameter shapes, the hub cache."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402 - a core dependency: absent is a failure, not a skip
from conftest import tiny_gpt2_config, tiny_llama_config  # noqa: E402
from safetensors.torch import load_file, save_file

from ckptaudit.errors import CorruptFileError, HubNotCachedError, InputNotFoundError, LayoutError
from ckptaudit.io.discover import discover_run
from ckptaudit.io.models import fill_model, load_model, param_shapes, resolve_model_path

VOCAB, SEQ = 64, 16


def gpt2_config():
    return tiny_gpt2_config(VOCAB, SEQ)


def llama_config():
    return tiny_llama_config(VOCAB, SEQ)


CONFIGS = {"gpt2": gpt2_config, "llama": llama_config}


def checkpoint(path: Path):
    """The Checkpoint for a saved model directory, as discover_run finds it."""
    run = discover_run(path)
    assert len(run) == 1, run
    return run[0]


def saved(kind: str, tmp_path: Path, dtype: torch.dtype = torch.float32):
    """A freshly initialised model of ``kind`` saved with save_pretrained into tmp_path/checkpoint-1."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).to(dtype).eval()
    out = tmp_path / "checkpoint-1"
    model.save_pretrained(out)
    return model, out


INPUT = torch.arange(12).reshape(2, 6) % VOCAB


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_param_shapes_equal_named_parameters(kind, tmp_path):
    model, out = saved(kind, tmp_path)
    expected = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    assert param_shapes(checkpoint(out)) == expected
    names = [n for n, _ in expected]
    assert ("lm_head.weight" in names) == (kind == "llama")  # GPT-2 ties its head to the embeddings


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_load_model_round_trip(kind, tmp_path):
    model, out = saved(kind, tmp_path)
    loaded = load_model(checkpoint(out))
    assert type(loaded) is type(model) and not loaded.training
    for (name, p), (name2, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert name == name2 and torch.equal(p, q), name
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, model(INPUT).logits)
    if kind == "gpt2":  # tied weights stay tied after loading
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_load_model_dtype(tmp_path):
    model, out = saved("gpt2", tmp_path, dtype=torch.bfloat16)
    loaded = load_model(checkpoint(out))  # default float32: stored bf16 values, upcast exactly
    assert loaded.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    assert torch.equal(
        loaded.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight.float()
    )
    half = load_model(checkpoint(out), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        assert torch.equal(half(INPUT).logits, model(INPUT).logits)


def test_load_model_refuses_missing_and_unexpected(tmp_path):
    _, out = saved("llama", tmp_path)
    weights = load_file(out / "model.safetensors")

    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(checkpoint(out))

    weights["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 64)
    weights["model.layers.2.extra.weight"] = torch.zeros(3)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LayoutError, match=r"model\.layers\.2\.extra\.weight"):
        load_model(checkpoint(out))


def test_load_model_refuses_shape_mismatch(tmp_path):
    _, out = saved("llama", tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = 48  # config no longer matches the weights
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CorruptFileError, match=r"mlp\.down_proj\.weight has shape \(32, 64\).*expects \(32, 48\)"
    ):
        load_model(checkpoint(out))


def fresh(kind: str, seed: int):
    """A model of ``kind`` with another random initialisation than ``saved``'s (seed 0)."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()


def assert_same_weights(reference: torch.nn.Module, filled: torch.nn.Module) -> None:
    for (name, p), (name2, q) in zip(reference.named_parameters(), filled.named_parameters(), strict=True):
        assert name == name2 and torch.equal(p, q), name
    for (name, b), (name2, c) in zip(reference.named_buffers(), filled.named_buffers(), strict=True):
        assert name == name2 and torch.equal(b, c), name


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fill_model_equals_the_saved_model(kind, tmp_path):
    """fill_model into a differently initialised model, from the open source, a dict and a stream of pairs:
    every parameter and buffer equals the model that was saved (the reference), and so do the logits."""
    model, out = saved(kind, tmp_path)
    ckpt = checkpoint(out)
    stored = load_file(out / "model.safetensors")
    forms = {"source": None, "dict": stored, "stream": lambda: iter(stored.items())}
    for seed, (form, tensors) in enumerate(forms.items(), start=1):
        target = fresh(kind, seed)
        assert not torch.equal(target.lm_head.weight, model.lm_head.weight)  # really overwritten below
        if form == "source":
            with ckpt.tensors() as source:
                assert fill_model(target, source, ckpt.path) is target
        else:
            fill_model(target, tensors() if callable(tensors) else tensors, out / "model.safetensors")
        assert_same_weights(model, target)
        with torch.no_grad():
            assert torch.equal(target(INPUT).logits, model(INPUT).logits), form
        if kind == "gpt2":  # the file holds the tied head once; it stays one tensor with the embeddings
            assert "lm_head.weight" not in stored
            assert target.lm_head.weight.data_ptr() == target.transformer.wte.weight.data_ptr()


def test_fill_model_converts_dtype_like_load_model(tmp_path):
    model, out = saved("llama", tmp_path, dtype=torch.bfloat16)
    target = fresh("llama", 1).to(torch.float64)
    fill_model(target, load_file(out / "model.safetensors"), out)
    for (name, p), (_, q) in zip(model.named_parameters(), target.named_parameters(), strict=True):
        assert q.dtype == torch.float64 and torch.equal(q, p.double()), name


def test_fill_model_refuses_a_wrong_shape_in_one_line(tmp_path):
    _, out = saved("llama", tmp_path)
    weights = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert tuple(weights[name].shape) == (64, 32)
    weights[name] = torch.zeros(48, 32)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    ckpt = checkpoint(out)

    target = fresh("llama", 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CorruptFileError) as err, ckpt.tensors() as source:
        fill_model(target, source, ckpt.path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{ckpt.path}: tensor {name} has shape (48, 32), the model expects (64, 32)")
    # a source is checked in full before anything is copied: the model is untouched
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # the same one-line error from a stream of pairs and from a dict
    for tensors in (iter(weights.items()), weights):
        with pytest.raises(CorruptFileError, match=rf"^prediction: tensor {re.escape(name)} has shape \(48, 32\), "
                           r"the model expects \(64, 32\)"):  # fmt: skip
            fill_model(fresh("llama", 1), tensors, "prediction")


def test_fill_model_refuses_unknown_and_missing_names(tmp_path):
    _, out = saved("gpt2", tmp_path)
    weights = load_file(out / "model.safetensors")
    for tensors in (lambda w: w, lambda w: iter(w.items())):
        extra = dict(weights, **{"transformer.h.9.mlp.c_fc.weight": torch.zeros(2)})
        with pytest.raises(LayoutError, match=r"^f\.safetensors: tensors with no place in GPT2LMHeadModel: "
                           r"transformer\.h\.9\.mlp\.c_fc\.weight"):  # fmt: skip
            fill_model(fresh("gpt2", 1), tensors(extra), "f.safetensors")
        short = {k: v for k, v in weights.items() if k != "transformer.ln_f.bias"}
        with pytest.raises(CorruptFileError, match=r"^f\.safetensors: weights GPT2LMHeadModel needs are missing "
                           r"from the files: transformer\.ln_f\.bias"):  # fmt: skip
            fill_model(fresh("gpt2", 1), tensors(short), "f.safetensors")


def test_no_config_is_refused(tmp_path):
    _, out = saved("gpt2", tmp_path)
    (out / "config.json").unlink()
    with pytest.raises(LayoutError, match="config.json"):
        param_shapes(checkpoint(out))
    with pytest.raises(LayoutError, match="config.json"):
        load_model(checkpoint(out))


# ------------------------------------------------------------------------------------------ hub cache


def test_resolve_local_path(tmp_path):
    _, out = saved("gpt2", tmp_path)
    assert resolve_model_path(str(out)) == out.resolve()
    assert resolve_model_path(str(out / "model.safetensors")) == (out / "model.safetensors").resolve()
    with pytest.raises(InputNotFoundError):
        resolve_model_path(str(tmp_path / "no" / "such" / "dir"))


def test_resolve_uncached_hub_id_fails_fast(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # no network call even when online mode is allowed
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(HubNotCachedError) as err:
        resolve_model_path("nonexistent-org/nonexistent-model-xyz")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert str(cache) in message and "never downloads" in message
    assert "hf download nonexistent-org/nonexistent-model-xyz" in message


def test_resolve_cached_hub_id(tmp_path, monkeypatch):
    # The cache layout huggingface_hub writes: models--org--name/{refs/<ref>, snapshots/<commit>/...}.
    cache = tmp_path / "hf-cache"
    repo = cache / "models--tiny-org--tiny-gpt2"
    commit, older = "a" * 40, "b" * 40
    for c in (commit, older):
        (repo / "snapshots" / c).mkdir(parents=True)
        (repo / "snapshots" / c / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("tiny-org/tiny-gpt2") == repo / "snapshots" / commit
    assert resolve_model_path(f"tiny-org/tiny-gpt2@{older}") == repo / "snapshots" / older
    with pytest.raises(HubNotCachedError):
        resolve_model_path("tiny-org/tiny-gpt2@v9")


def test_buffers_the_model_rebuilds_are_skipped_and_unknown_tensors_still_refused():
    """Older transformers saved BERT's position_ids buffer (all-MiniLM-L6-v2's model.safetensors holds it); the
    model keeps it out of its state dict (persistent=False) and rebuilds it, so a stored copy is skipped. A tensor
    the model has no place for is still an error."""
    import transformers

    from ckptaudit.errors import LayoutError
    from ckptaudit.io.models import fill_model

    cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                                  vocab_size=40, max_position_embeddings=16)
    src = transformers.BertModel(cfg)
    stored = {k: v.clone() + 1.0 if v.is_floating_point() else v.clone() for k, v in src.state_dict().items()}
    assert "embeddings.position_ids" not in stored
    stored["embeddings.position_ids"] = torch.arange(16)[None]
    dst = fill_model(transformers.BertModel(cfg), stored, "minilm")
    for k, v in dst.state_dict().items():
        assert torch.equal(v, stored[k]), k
    with pytest.raises(LayoutError, match="no place"):
        fill_model(transformers.BertModel(cfg), {**stored, "embeddings.extra": torch.zeros(2)}, "minilm")
