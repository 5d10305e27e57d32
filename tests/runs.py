"""Building runs for the tests: Trainer-style checkpoint folders (model.safetensors or a sharded index, config.json,
trainer_state.json) from given tensors, seeded random trajectories of a tiny GPT-2 layout, and the smallest Run /
Checkpoint objects the analyses accept. Runs written by the training stacks themselves come from fixtures/ (the
session fixtures of conftest.py); these are for planted values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ckptaudit.io.tensors import open_tensors


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


def write_checkpoint(d: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, dtype=None,
                     shards: int = 1, trainer_state: dict | None = None) -> Path:
    """One checkpoint folder ``d``: ``tensors`` (cast to ``dtype`` when given) in model.safetensors, or in ``shards``
    files with a model.safetensors.index.json (tensor i in shard i mod shards); config.json and trainer_state.json
    when given. Returns ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in tensors.items()}
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
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if trainer_state is not None:
        (d / "trainer_state.json").write_text(json.dumps(trainer_state))
    return d


def write_checkpoints(root: Path, thetas: list[dict[str, torch.Tensor]], steps: list[int], config: dict | None,
                      dtype=torch.float32, shards: int = 1, log_history: list | None = None) -> list[Path]:
    """One Trainer-style directory root/checkpoint-{step} per step (:func:`write_checkpoint`)."""
    return [write_checkpoint(root / f"checkpoint-{step}", theta, config, dtype=dtype, shards=shards,
                             trainer_state=None if log_history is None else {"global_step": step, "log_history": log_history})
            for step, theta in zip(steps, thetas, strict=True)]


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
