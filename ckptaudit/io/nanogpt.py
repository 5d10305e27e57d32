"""nanoGPT checkpoints: ``ckpt.pt`` / ``ckpt_N.pt`` = {model, optimizer, model_args, iter_num, best_val_loss,
config}, as nanoGPT's train.py saves them (weights-only loadable).

- Step: ``iter_num``.
- Weights: ``model``, without the ``_orig_mod.`` prefix torch.compile adds, without the causal-mask buffers
  (``attn.bias`` [1, 1, T, T]) that nanoGPT registers when flash attention is unavailable; the tied
  ``lm_head.weight`` shares the storage of ``transformer.wte.weight`` and is listed once (PickleSource).
  Names and shapes stay nanoGPT's: ``c_attn`` / ``c_proj`` / ``c_fc`` are nn.Linear ([out, in]; c_attn [3d, d]).
- Optimizer: the ``optimizer`` entry, a torch AdamW state dict of two groups (weights of dim >= 2, then the rest)
  in nanoGPT's ``named_parameters()`` order, which is the order of the stored names.
- Model: a GPT-2 config built from ``model_args`` (n_layer, n_head, n_embd, block_size, vocab_size, bias; exact
  GELU, LayerNorm eps 1e-5, tied head, no dropout) and filled with the Linear weights transposed into GPT-2's
  Conv1D layout ([in, out]); with ``bias=False`` GPT-2's biases are zero, which computes the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError
from ckptaudit.io.keys import MappedSource
from ckptaudit.io.source import TensorSource
from ckptaudit.io.torchload import safe_torch_load
from ckptaudit.io.types import StoredCheckpoint, checkpoint_path

COMPILE_PREFIX = "_orig_mod."
# nn.Linear weights of nanoGPT whose GPT-2 counterpart is a Conv1D (transposed)
LINEAR_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_GPT2_BIASES = (".ln_1.bias", ".ln_2.bias", ".attn.c_attn.bias", ".attn.c_proj.bias", ".mlp.c_fc.bias",
                ".mlp.c_proj.bias")


def is_nanogpt(obj: Any) -> bool:
    """Whether a loaded ``torch.save`` object is a nanoGPT checkpoint."""
    return (isinstance(obj, Mapping) and isinstance(obj.get("model_args"), Mapping) and "iter_num" in obj
            and isinstance(obj.get("model"), Mapping))


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> dict:
    return safe_torch_load(Path(path))


def detect(path: Path) -> bool:
    """Whether the torch.save file at ``path`` is a nanoGPT checkpoint (a file that cannot be read
    weights-only is not; reading it as weights reports why)."""
    from ckptaudit.errors import CkptAuditError

    try:
        return is_nanogpt(load(path))
    except CkptAuditError:
        return False


def load(path: Path) -> dict:
    """The checkpoint dict (weights-only, memory-mapped; the last few are cached by path and mtime)."""
    p = Path(path)
    return _load(str(p), p.stat().st_mtime_ns)


def step(path: Path) -> int:
    """``iter_num`` of the checkpoint."""
    value = load(path)["iter_num"]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CorruptFileError(f"{path}: iter_num {value!r} is not an integer", hint="re-save the checkpoint") from None


def _path(ckpt: StoredCheckpoint | Path) -> Path:
    return checkpoint_path(ckpt)


def config(ckpt: Any) -> dict:
    """A GPT-2 config.json dict equivalent to the checkpoint's ``model_args``."""
    path = _path(ckpt)
    args = dict(load(path)["model_args"])
    try:
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_layer": int(args["n_layer"]), "n_head": int(args["n_head"]), "n_embd": int(args["n_embd"]),
            "n_positions": int(args["block_size"]), "vocab_size": int(args["vocab_size"]),
            "activation_function": "gelu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "bos_token_id": None, "eos_token_id": None,
        }  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{path}: model_args lacks or garbles {exc}", hint="re-save the checkpoint") from None


def open_tensors(ckpt: Any) -> TensorSource:
    """The model tensors under nanoGPT's names (see the module docstring)."""
    from ckptaudit.io.detect import detect_format
    from ckptaudit.io.formats import PickleSource

    path = _path(ckpt)
    src = PickleSource(path, detect_format(path))
    keys = src.keys()
    strip = COMPILE_PREFIX if keys and all(k.startswith(COMPILE_PREFIX) for k in keys) else ""
    names = {}
    for key in keys:
        name = key[len(strip):]
        if name.endswith(".attn.bias") and len(src.shape(key)) == 4:
            continue  # the causal mask buffer, not a weight
        names[name] = key
    return MappedSource(src, names)


def param_shapes(ckpt: Any) -> list[tuple[str, tuple[int, ...]]]:
    """nanoGPT's ``named_parameters()`` as (name, shape): the stored names in file order."""
    with open_tensors(ckpt) as src:
        return [(n, tuple(src.shape(n))) for n in src.keys()]


def optimizer_dict(ckpt: Any) -> dict | None:
    """The ``optimizer`` entry (a torch optimizer state dict), or None when the file has none."""
    opt = load(_path(ckpt)).get("optimizer")
    return opt if isinstance(opt, Mapping) else None


def model_source(source: TensorSource, ckpt: Any, model: torch.nn.Module) -> TensorSource:
    """``source`` (nanoGPT names) as GPT-2's tensors: Linear weights transposed, missing biases as zeros."""
    names = {k: k for k in source.keys()}
    transforms = {}
    shapes = {}
    for name in names:
        if name.endswith(LINEAR_SUFFIXES):
            transforms[name] = lambda t: t.t().contiguous()
            shapes[name] = tuple(reversed(source.shape(name)))
    extra = {}
    if load(_path(ckpt))["model_args"].get("bias", True) is False:  # GPT-2 always has biases: zero computes the same
        extra = {name: torch.zeros_like(t) for name, t in model.state_dict().items()
                 if name.endswith(_GPT2_BIASES + ("ln_f.bias",)) and name not in names}
    return MappedSource(source, names, transforms, shapes, extra=extra)


def optimizer_to_model(state: Any, params: Any) -> Any:
    """An OptimizerState keyed by nanoGPT's names and shapes, re-laid for the GPT-2 model built from the
    checkpoint (``params``: its named_parameters as (name, shape)): the moments of the Linear weights are
    transposed like the weights. The names are the same; a model with parameters the optimizer never had (GPT-2's
    biases of a bias=False model) cannot take the state: OptimizerStateError."""
    import dataclasses

    from ckptaudit.errors import OptimizerStateError

    have = [n for names in state.names for n in names]
    want = [n for n, _ in params]
    if sorted(have) != sorted(want):
        extra = [n for n in want if n not in set(have)]
        raise OptimizerStateError(
            f"{state.source}: the GPT-2 model built from model_args has parameters nanoGPT's optimizer never had "
            f"({', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}: a bias=False model)",
            hint="CONTROL cannot restore this optimizer state; RESET conditions run with --reset-optimizer")
    raw = dict(state.raw)
    raw["state"] = dict(raw["state"])
    index = {n: i for names, group in zip(state.names, raw["param_groups"], strict=True)
             for n, i in zip(names, group["params"], strict=True)}
    new_state = dict(state.state)
    for name, i in index.items():
        entry = raw["state"].get(i)
        if not name.endswith(LINEAR_SUFFIXES) or not isinstance(entry, dict):
            continue
        entry = {k: (v.t().contiguous() if isinstance(v, torch.Tensor) and v.ndim == 2 else v) for k, v in entry.items()}
        raw["state"][i] = entry
        if name in new_state:
            new_state[name] = dataclasses.replace(new_state[name], exp_avg=entry.get("exp_avg"),
                                                  exp_avg_sq=entry.get("exp_avg_sq"))
    return dataclasses.replace(state, raw=raw, state=new_state, mapping=state.mapping + " (nanoGPT -> GPT-2 layout)")
