"""Streaming Gram engine against explicitly stacked drift matrices (numpy), on real safetensors checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptaudit.analyses.gram import (
    SafetensorsStreamWriter,
    drift_grams,
    shard_tensor_names,
    sum_grams,
    tensor_names_of,
)
from ckptaudit.errors import LayoutError
from ckptaudit.io.roles import resolve_architecture
from ckptaudit.io.tensors import open_tensors

# ----------------------------------------------------------------------------------------------- run builders


def gpt2_shapes(d: int, n_layers: int, vocab: int = 11, n_pos: int = 8) -> dict[str, tuple[int, ...]]:
    """GPT-2 (Conv1D) tensor names and shapes of a tiny model."""
    s: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (n_pos, d)}
    for layer in range(n_layers):
        p = f"transformer.h.{layer}."
        s.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        })
    s["transformer.ln_f.weight"] = (d,)
    s["transformer.ln_f.bias"] = (d,)
    return s


def gpt2_config(d: int, n_layers: int, n_heads: int = 2) -> dict:
    return {"model_type": "gpt2", "n_embd": d, "n_layer": n_layers, "n_head": n_heads, "vocab_size": 11,
            "n_positions": 8}


def reference_parts(d: int, n_layers: int, blocks=None) -> dict[str, list[tuple[str, tuple]]]:
    """Independent description of the groups (tensor, numpy index) from the GPT-2 layout of SPEC section 0."""
    groups: dict[str, list] = {"trunk": [], "group_G": [], "group_S": []}
    every = slice(None)
    for layer in range(n_layers):
        p = f"transformer.h.{layer}."
        parts = [(p + "attn.c_attn.weight", (every, slice(0, d)), "G"), (p + "attn.c_attn.weight", (every, slice(d, 2 * d)), "G"),
                 (p + "attn.c_attn.weight", (every, slice(2 * d, 3 * d)), "S"), (p + "attn.c_proj.weight", (every,), "S"),
                 (p + "mlp.c_fc.weight", (every,), "S"), (p + "mlp.c_proj.weight", (every,), "S")]
        groups[f"block_{layer}"] = []
        for name, idx, g in parts:
            groups["trunk"].append((name, idx))
            groups[f"block_{layer}"].append((name, idx))
            groups[f"group_{g}"].append((name, idx))
    return groups


def write_checkpoints(root: Path, thetas: list[dict[str, torch.Tensor]], steps: list[int], config: dict,
                      dtype=torch.float32, shards: int = 1, log_history: list | None = None) -> list[Path]:
    """One Trainer-style directory per step holding model.safetensors (or a sharded index) and config.json."""
    paths = []
    for step, theta in zip(steps, thetas, strict=True):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        tensors = {k: v.to(dtype).contiguous() for k, v in theta.items()}
        if shards == 1:
            save_file(tensors, str(d / "model.safetensors"))
        else:
            names = list(tensors)
            weight_map = {}
            for s in range(shards):
                fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
                part = {n: tensors[n] for n in names[s::shards]}
                save_file(part, str(d / fname))
                weight_map.update(dict.fromkeys(part, fname))
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text(json.dumps(config))
        if log_history is not None:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log_history}))
        paths.append(d)
    return paths


@dataclass(frozen=True)
class FakeCheckpoint:
    """The Checkpoint contract (docs/architecture.md) reduced to what the analyses use."""

    step: int
    path: Path

    def tensors(self):
        return open_tensors(self.path)

    def config(self):
        f = self.path / "config.json"
        return json.loads(f.read_text()) if f.exists() else None

    def trainer_state(self):
        f = self.path / "trainer_state.json"
        return json.loads(f.read_text()) if f.exists() else None

    @property
    def weight_files(self):
        return tuple(sorted(self.path.glob("*.safetensors")))


@dataclass(frozen=True)
class FakeRun:
    path: Path
    checkpoints: tuple

    @property
    def steps(self):
        return [c.step for c in self.checkpoints]


def make_run(root: Path, thetas, steps, config, **kw) -> FakeRun:
    paths = write_checkpoints(root, thetas, steps, config, **kw)
    return FakeRun(root, tuple(FakeCheckpoint(s, p) for s, p in zip(steps, paths, strict=True)))


def random_trajectory(shapes: dict, n: int, seed: int = 0, drift: float = 0.05, noise: float = 0.02,
                      planted: dict | None = None) -> list[dict[str, torch.Tensor]]:
    """theta(t) = theta0 + t * drift * b + random walk; with ``planted``, drift only along that direction."""
    g = torch.Generator().manual_seed(seed)
    theta0 = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    b = planted if planted is not None else {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    walk = {k: torch.zeros(s) for k, s in shapes.items()}
    out = []
    for t in range(n):
        if t:
            for k, s in shapes.items():
                walk[k] += noise * torch.randn(s, generator=g)
        out.append({k: theta0[k] + drift * t * b[k] * (1 + 0.3 * np.sin(t)) + walk[k] for k in shapes})
    return out


def stacked(run: FakeRun, parts: list[tuple[str, tuple]], anchor_idx: int = 0, rows=None) -> np.ndarray:
    """The explicit drift matrix X [T, D] (float64 of the stored values), rows = checkpoints after the anchor."""
    def vec(ck):
        with open_tensors(ck.path) as src:
            return np.concatenate([src.get(n).to(torch.float64).numpy()[idx].ravel() for n, idx in parts])
    base = vec(run.checkpoints[anchor_idx])
    rows = run.checkpoints[anchor_idx + 1 :] if rows is None else rows
    return np.stack([vec(c) - base for c in rows])


def arch_groups(run: FakeRun, blocks=None) -> dict[str, list]:
    from ckptaudit.analyses.backbone import backbone_groups

    c0 = run.checkpoints[0]
    with c0.tensors() as src:
        shapes = {n: src.shape(n) for n in src.keys()}
    return backbone_groups(resolve_architecture(shapes, c0.config()), blocks)


# ---------------------------------------------------------------------------------------------------- tests

D_MODEL, LAYERS = 8, 2


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> FakeRun:
    shapes = gpt2_shapes(D_MODEL, LAYERS)
    steps = [0, 10, 20, 30, 45, 60, 80]
    return make_run(tmp_path_factory.mktemp("gram"), random_trajectory(shapes, len(steps)), steps,
                    gpt2_config(D_MODEL, LAYERS))


def test_grams_match_stacked_numpy(small_run):
    groups = arch_groups(small_run)
    ref = reference_parts(D_MODEL, LAYERS)
    calls = []
    gs = drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups, progress=calls.append)
    assert set(gs.grams) == set(ref)
    for name, parts in ref.items():
        X = stacked(small_run, parts)
        np.testing.assert_allclose(gs.grams[name], X @ X.T, rtol=1e-12, atol=1e-12 * np.abs(X @ X.T).max())
        assert gs.dims[name] == X.shape[1]
    assert sum(calls) == len(tensor_names_of(groups))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunk_smaller_than_tensor_gives_same_gram(small_run, chunk):
    groups = arch_groups(small_run)
    full = drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups, chunk_elems=1 << 20)
    part = drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups, chunk_elems=chunk)
    for k in full.grams:
        np.testing.assert_allclose(part.grams[k], full.grams[k], rtol=1e-12, atol=1e-12 * np.abs(full.grams[k]).max())


def test_partial_grams_over_disjoint_tensors_sum_to_full(small_run):
    groups = arch_groups(small_run)
    names = tensor_names_of(groups)
    full = drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups)
    parts = [drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups,
                         tensor_names=shard_tensor_names(names, r, 3)) for r in range(3)]
    assert sorted(n for p in parts for n in p.tensor_names) == sorted(names)
    total = sum_grams(parts)
    added = parts[0] + parts[1] + parts[2]
    for k in full.grams:
        np.testing.assert_allclose(total.grams[k], full.grams[k], rtol=1e-12, atol=1e-12 * np.abs(full.grams[k]).max())
        np.testing.assert_allclose(added.grams[k], full.grams[k], rtol=1e-12, atol=1e-12 * np.abs(full.grams[k]).max())
        assert total.dims[k] == full.dims[k]


def test_anchor_in_rows_gives_zero_row_and_open_sources(small_run):
    groups = {"trunk": arch_groups(small_run)["trunk"]}
    srcs = [c.tensors() for c in small_run.checkpoints]  # already-open TensorSources are accepted too
    gs = drift_grams(srcs, srcs[2], groups)
    G = gs.grams["trunk"]
    assert np.all(G[2] == 0) and np.all(G[:, 2] == 0)
    X = stacked(small_run, reference_parts(D_MODEL, LAYERS)["trunk"], anchor_idx=2, rows=small_run.checkpoints)
    np.testing.assert_allclose(G, X @ X.T, rtol=1e-12, atol=1e-12 * np.abs(G).max())


def test_bf16_and_sharded_checkpoints(tmp_path):
    shapes = gpt2_shapes(D_MODEL, 1)
    steps = [0, 5, 9, 14]
    run = make_run(tmp_path, random_trajectory(shapes, len(steps), seed=3), steps, gpt2_config(D_MODEL, 1),
                   dtype=torch.bfloat16, shards=3)
    with run.checkpoints[0].tensors() as src:
        assert src.format == "safetensors-index" and src.dtype("transformer.h.0.mlp.c_fc.weight") == torch.bfloat16
    groups = arch_groups(run)
    gs = drift_grams(run.checkpoints[1:], run.checkpoints[0], groups, chunk_elems=50)
    for name, parts in reference_parts(D_MODEL, 1).items():
        X = stacked(run, parts)  # the bf16 values upcast
        np.testing.assert_allclose(gs.grams[name], X @ X.T, rtol=1e-12, atol=1e-12 * np.abs(X @ X.T).max())


def test_mismatched_shapes_are_a_layout_error(tmp_path):
    shapes = gpt2_shapes(D_MODEL, 1)
    thetas = random_trajectory(shapes, 3)
    thetas[2]["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(D_MODEL, 2 * D_MODEL)
    thetas[2]["transformer.h.0.mlp.c_proj.weight"] = torch.zeros(2 * D_MODEL, D_MODEL)
    run = make_run(tmp_path, thetas, [0, 1, 2], gpt2_config(D_MODEL, 1))
    with pytest.raises(LayoutError, match="checkpoint 2"):
        drift_grams(run.checkpoints[1:], run.checkpoints[0], arch_groups(FakeRun(tmp_path, run.checkpoints[:1])))


def test_stream_writer_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"b.weight": torch.randn(2, 3, 5, generator=g), "a": torch.randn(7, generator=g),
               "empty": torch.zeros(0, 4)}
    w = SafetensorsStreamWriter(tmp_path / "v.safetensors", {k: (tuple(v.shape), torch.float32) for k, v in tensors.items()},
                                {"k": "2"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "v.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    w2 = SafetensorsStreamWriter(tmp_path / "x.safetensors", {"a": ((2,), torch.float32)})
    with pytest.raises(ValueError):
        w2.write("b", torch.zeros(2))
    w2.abort()
    assert not any(tmp_path.glob("*x.safetensors*"))
