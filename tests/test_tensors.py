"""ckptaudit.io.tensors / ckptaudit.io.dcp on real files written by the libraries that own each format."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckptaudit.errors import CorruptFileError, InputNotFoundError, LayoutError, UnsafePickleError
from ckptaudit.io.dcp import read_dcp_metadata
from ckptaudit.io.tensors import TensorNotFoundError, detect_format, open_tensors, safe_torch_load


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.attn.q.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layers.0.attn.q.bias": torch.randn(8, generator=g).to(torch.float16),
        "layers.0.mlp.up.weight": torch.randn(32, 8, generator=g),
        "counter": torch.arange(5, dtype=torch.int64),
    }


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (dtype, shape and every byte), so bf16 round-trips are checked exactly."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().view(torch.uint8).flatten().numpy()) == bytes(
        b.contiguous().view(torch.uint8).flatten().numpy()
    )


class _Payload:
    """Unpickling this would create the file ``target``: proof that a loader ran the pickle's code."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


# ------------------------------------------------------------------------------------------ safetensors


def test_single_safetensors_keeps_dtypes_and_bits(tmp_path: Path) -> None:
    sd = _state()
    f = tmp_path / "weights.bin"  # a misleading extension: detection is by content
    save_file(sd, str(f))
    assert detect_format(f) == "safetensors"
    with open_tensors(f) as src:
        assert src.format == "safetensors"
        assert sorted(src.keys()) == sorted(sd)
        assert src.files() == [f]
        for k, t in sd.items():
            assert src.shape(k) == tuple(t.shape)
            assert src.dtype(k) == t.dtype
            assert src.nbytes(k) == t.numel() * t.element_size()
            assert _bits_equal(src.get(k), t)
        assert src.dtype("layers.0.attn.q.weight") == torch.bfloat16
        with pytest.raises(TensorNotFoundError, match="no tensor named 'nope'"):
            src.get("nope")
        with pytest.raises(KeyError):
            src.shape("nope")


def test_truncated_safetensors_is_corrupt(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    save_file(_state(), str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors.*re-save or re-download"):
        open_tensors(f)
    # a header that promises more bytes than the file has
    g = tmp_path / "bad.safetensors"
    g.write_bytes((10_000).to_bytes(8, "little") + b'{"a": 1}')
    with pytest.raises(CorruptFileError, match="bad.safetensors"):
        open_tensors(g)


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nothing.safetensors"):
        open_tensors(tmp_path / "nothing.safetensors")
    txt = tmp_path / "notes.pt"
    txt.write_text("hello, not a checkpoint")
    with pytest.raises(LayoutError, match="notes.pt"):
        detect_format(txt)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    with pytest.raises(LayoutError, match="no model weights found.*README.md"):
        open_tensors(empty)


def test_sharded_checkpoint_from_transformers(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    assert index.is_file()
    assert detect_format(index) == "safetensors-index"
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not stored
    with open_tensors(tmp_path / "m") as src:
        assert src.format == "safetensors-index"
        assert set(src.keys()) == set(expected)
        assert len(src.files()) > 1
        assert all(f.name.startswith("model-0000") for f in src.files())
        for k, t in expected.items():
            assert src.shape(k) == tuple(t.shape)
            assert torch.equal(src.get(k), t)
    # a shard removed after the fact is reported by name
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InputNotFoundError, match=victim.name):
        open_tensors(index)


def test_shapes_without_reading_data(tmp_path: Path) -> None:
    """keys/shape/dtype come from the header: a file whose tensor bytes are garbage still answers them (and the
    garbage is what a read returns, so the bytes really were overwritten)."""
    import struct

    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 32), "b": torch.zeros(7, dtype=torch.float16)}, str(f))
    raw = bytearray(f.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]  # the data region follows the 8-byte length and the JSON header
    assert len(raw) - start == 64 * 32 * 4 + 7 * 2
    garbage = torch.randint(0, 256, (len(raw) - start,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    raw[start:] = bytes(garbage.tolist())
    f.write_bytes(bytes(raw))
    with open_tensors(f) as src:
        assert sorted(src.keys()) == ["b", "w"]
        assert src.shape("w") == (64, 32) and src.dtype("w") == torch.float32
        assert src.shape("b") == (7,) and src.dtype("b") == torch.float16
        got = torch.cat([src.get(n).reshape(-1).view(torch.uint8) for n in src.keys()])
    assert sorted(got.tolist()) == sorted(garbage.tolist())  # the tensors hold the garbage, not zeros


# ------------------------------------------------------------------------------------------ torch pickles


@pytest.mark.parametrize("zipped", [True, False])
@pytest.mark.parametrize("nest", [None, "state_dict", "model", "model_state_dict", "module"])
def test_pickled_state_dicts(tmp_path: Path, zipped: bool, nest: str | None) -> None:
    sd = _state(1)
    obj = dict(sd) if nest is None else {nest: sd, "epoch": 3, "note": "text", "optimizer": {"lr": torch.tensor(1.0)}}
    if nest is None:
        obj["step_count"] = 7  # a non-tensor entry: ignored
    f = tmp_path / "x.pt"
    torch.save(obj, f, _use_new_zipfile_serialization=zipped)
    assert detect_format(f) == ("torch-zip" if zipped else "torch-legacy")
    with open_tensors(f) as src:
        assert src.keys() == list(sd)
        for k, t in sd.items():
            assert src.shape(k) == tuple(t.shape) and src.dtype(k) == t.dtype
            assert _bits_equal(src.get(k), t)


def test_lightning_style_ckpt(tmp_path: Path) -> None:
    sd = {"net.0.weight": torch.randn(4, 3), "net.0.bias": torch.randn(4)}
    f = tmp_path / "epoch=1-step=50.ckpt"
    torch.save(
        {"epoch": 1, "global_step": 50, "pytorch-lightning_version": "2.6.6", "state_dict": sd,
         "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4, 3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
         "lr_schedulers": [], "loops": {}, "callbacks": {}},
        f,
    )
    with open_tensors(f) as src:
        assert src.keys() == ["net.0.weight", "net.0.bias"]
        assert torch.equal(src.get("net.0.bias"), sd["net.0.bias"])


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, zipped: bool) -> None:
    target = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Payload(target)}, f, _use_new_zipfile_serialization=zipped)
    assert not target.exists()
    with pytest.raises(UnsafePickleError) as err:
        open_tensors(f)
    msg = str(err.value)
    assert "evil.pt" in msg and "io.open" in msg and "was run" in msg
    with pytest.raises(UnsafePickleError):
        safe_torch_load(f)
    assert not target.exists()


def test_os_system_pickle_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned_system"

    class Sys:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    f = tmp_path / "evil2.pt"
    torch.save({"x": Sys()}, f)
    with pytest.raises(UnsafePickleError, match=r"system"):
        safe_torch_load(f)
    assert not target.exists()


def test_extra_globals_allow_listed(tmp_path: Path) -> None:
    from argparse import Namespace

    f = tmp_path / "c.pt"
    torch.save({"args": Namespace(lr=0.5)}, f)
    with pytest.raises(UnsafePickleError, match="argparse.Namespace"):
        safe_torch_load(f)
    assert safe_torch_load(f, extra_globals=[Namespace])["args"].lr == 0.5


def test_truncated_torch_zip_is_corrupt(tmp_path: Path) -> None:
    f = tmp_path / "t.pt"
    torch.save(_state(), f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="t.pt"):
        open_tensors(f)


# ------------------------------------------------------------------------------------------ GGUF


def test_gguf_f32_f16_bf16_q8(tmp_path: Path) -> None:
    import gguf

    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((4, 64)).astype(np.float32)
    a16 = rng.standard_normal((8, 32)).astype(np.float16)
    aq = rng.standard_normal((6, 64)).astype(np.float32)
    abf = torch.randn(3, 32).to(torch.bfloat16)
    f = tmp_path / "model.weights"  # no telling extension
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_tensor("f32", a32)
    w.add_tensor("f16", a16)
    q = gguf.quants.quantize(aq, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    raw = abf.view(torch.int16).numpy().view(np.uint8)
    w.add_tensor("bf16", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert detect_format(f) == "gguf"
    with open_tensors(f) as src:
        assert src.keys() == ["f32", "f16", "q8", "bf16"]
        assert src.shape("f32") == (4, 64) and src.dtype("f32") == torch.float32
        assert src.shape("f16") == (8, 32) and src.dtype("f16") == torch.float16
        assert src.shape("q8") == (6, 64) and src.dtype("q8") == torch.float32
        assert src.shape("bf16") == (3, 32) and src.dtype("bf16") == torch.bfloat16
        assert np.array_equal(src.get("f32").numpy(), a32)
        assert np.array_equal(src.get("f16").numpy(), a16)
        assert _bits_equal(src.get("bf16"), abf)
        got = src.get("q8")
        assert got.dtype == torch.float32 and tuple(got.shape) == (6, 64)
        # Q8_0: blocks of 32 sharing one fp16 scale d = max|block|/127; rounding error <= d/2 (+ fp16 scale error)
        assert np.abs(got.numpy() - aq).max() <= 0.6 * np.abs(aq).max() / 127
        assert np.abs(got.numpy() - aq).max() > 0  # really quantised, so the tolerance is doing work
        assert src.nbytes("q8") == 6 * 64 * 4


# ------------------------------------------------------------------------------------------ DCP


def _dcp_save(sd: dict, d: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(d), no_dist=True)


def test_dcp_folder_model_tensors(tmp_path: Path) -> None:
    model = _state(2)
    d = tmp_path / "dcp"
    _dcp_save({"model": dict(model), "optimizer": {"state": {"embed.weight": {"exp_avg": torch.ones(16, 8)}}},
               "step": 12}, d)
    assert detect_format(d) == "dcp"
    with open_tensors(d) as src:
        assert src.format == "dcp"
        assert sorted(src.keys()) == sorted(model)  # optimizer moments and the int are not model tensors
        assert src.shape("layers.0.mlp.up.weight") == (32, 8)
        assert src.dtype("layers.0.attn.q.weight") == torch.bfloat16
        for k, t in model.items():
            assert _bits_equal(src.get(k), t)
        assert all(f.suffix == ".distcp" for f in src.files())


def test_dcp_flat_state_dict(tmp_path: Path) -> None:
    flat = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    _dcp_save(flat, tmp_path / "flat")
    with open_tensors(tmp_path / "flat") as src:
        assert sorted(src.keys()) == ["a", "b"]
        assert torch.equal(src.get("a"), flat["a"])


def test_malicious_dcp_metadata_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "evil_dcp"
    _dcp_save({"model": {"w": torch.ones(2)}}, d)
    target = tmp_path / "pwned_dcp"
    with open(d / ".metadata", "wb") as f:
        pickle.dump(_Payload(target), f)
    with pytest.raises(UnsafePickleError, match=r"\.metadata.*(io|builtins)\.open.*was run"):
        open_tensors(d)
    with pytest.raises(UnsafePickleError):
        read_dcp_metadata(d)
    assert not target.exists()


def test_garbage_dcp_metadata_is_corrupt(tmp_path: Path) -> None:
    d = tmp_path / "bad_dcp"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CorruptFileError, match="not DCP Metadata"):
        open_tensors(d)
