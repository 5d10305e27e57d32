"""DeepSpeed engine checkpoints, read without DeepSpeed: ``SAVE_DIR/latest`` names the tag, ``SAVE_DIR/TAG/``
(``global_stepN``) holds the files; the HF Trainer with DeepSpeed writes the same inside ``checkpoint-N/``.

- ``mp_rank_00_model_states.pt`` (ZeRO 0-2; ZeRO 3: ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank):
  ``module`` (the full state dict at ZeRO 0-2, a tied head stored twice with one storage; empty placeholders at
  ZeRO 3), ``param_shapes`` (per optimizer group: name -> shape, in flattening order), ``buffer_names``,
  ``optimizer`` (a plain torch optimizer state dict at ZeRO 0, else None), ``lr_scheduler``, ``global_steps``,
  ``ds_config``. Weights-only loadable.
- ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` (ZeRO >= 1, one per data-parallel rank): ``optimizer_state_dict``
  with the flat fp32 partitions of each group and the base optimizer's flat moments, beside a pickled
  ``LossScaler`` object: read with ``io.plainpickle`` (stand-ins, no DeepSpeed code imported or run).
  ZeRO 1/2: rank r holds elements [r*P, (r+1)*P) of each group's flat vector (concatenated over ranks, trailing
  padding dropped); parameters follow each other in ``param_shapes`` order. ZeRO 3: every parameter is split on
  its own, ceil(numel / world) elements per rank (zero-padded), in ``param_shapes`` order within each rank's
  flat group.

Weights: ``module`` at ZeRO 0-2; the fp32 partitions reassembled at ZeRO 3. Optimizer state: a torch state dict
keyed by index with ``param_names`` in every group (names from ``param_shapes``), so it maps exactly.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError, OptimizerStateError
from ckptaudit.io.source import TensorSource
from ckptaudit.io.types import StoredCheckpoint, checkpoint_path

MODEL_STATES = "mp_rank_00_model_states.pt"
_RANK_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_RANK_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_ALLOW = ("deepspeed.",)  # the optim-states pickle names DeepSpeed classes (LossScaler, ZeroStageEnum, ...)


def is_engine_dir(d: Path) -> bool:
    """Whether folder ``d`` is one DeepSpeed engine checkpoint (a tag folder such as global_stepN)."""
    d = Path(d)
    return d.is_dir() and ((d / MODEL_STATES).is_file() or any(_RANK_MODEL_RE.match(f.name) for f in d.iterdir()))


def engine_dir_of(folder: Path) -> Path | None:
    """The engine checkpoint inside a Trainer checkpoint folder: the tag named by ``latest``, else the only
    global_step* folder; None when there is none."""
    folder = Path(folder)
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if tag and "/" not in tag and is_engine_dir(folder / tag):
            return folder / tag
    found = [p for p in sorted(folder.glob("global_step*")) if is_engine_dir(p)]
    return found[0] if len(found) == 1 else None


def _ranked(d: Path, rx: re.Pattern) -> list[Path]:
    files = sorted((int(m.group(1)), f) for f in d.iterdir() if (m := rx.match(f.name)))
    if [r for r, _ in files] != list(range(len(files))):
        raise CorruptFileError(f"{d}: the per-rank files are not ranks 0..{len(files) - 1} "
                               f"({', '.join(f.name for _, f in files)})", hint="copy every rank's file")
    return [f for _, f in files]


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> Any:
    from ckptaudit.io.plainpickle import load_plain

    return load_plain(Path(path), _ALLOW, "DeepSpeed checkpoint")


def _states(path: Path) -> dict:
    obj = _load(str(path), Path(path).stat().st_mtime_ns)
    if not isinstance(obj, Mapping):
        raise CorruptFileError(f"{path}: not a DeepSpeed checkpoint dict", hint="re-save the checkpoint")
    return dict(obj)


def model_states(d: Path) -> dict:
    """The (rank-0) model-states dict of engine checkpoint ``d``."""
    d = Path(d)
    path = d / MODEL_STATES if (d / MODEL_STATES).is_file() else _ranked(d, _RANK_MODEL_RE)[0]
    return _states(path)


def zero_stage(d: Path) -> int:
    """The ZeRO stage the checkpoint was written with (ds_config, else the optimizer files)."""
    cfg = model_states(d).get("ds_config")
    stage = ((cfg or {}).get("zero_optimization") or {}).get("stage") if isinstance(cfg, Mapping) else None
    if stage is None:
        optim = _optim_states(d)
        stage = optim[0].get("zero_stage") if optim else 0
    return int(stage or 0)


def step(d: Path) -> int | None:
    """``global_steps`` recorded in the model states, or None."""
    value = model_states(d).get("global_steps")
    return int(value) if isinstance(value, int) else None


def _optim_states(d: Path) -> list[dict]:
    out = []
    for f in _ranked(Path(d), _RANK_OPTIM_RE):
        sd = _states(f).get("optimizer_state_dict")
        if not isinstance(sd, Mapping):
            raise CorruptFileError(f"{f}: no optimizer_state_dict", hint="re-save the checkpoint")
        out.append(dict(sd))
    return out


def _param_shapes(d: Path) -> list[list[tuple[str, tuple[int, ...]]]]:
    shapes = model_states(d).get("param_shapes")
    if not isinstance(shapes, list) or not all(isinstance(g, Mapping) for g in shapes):
        raise CorruptFileError(f"{d}: param_shapes is missing or not a list of name -> shape",
                               hint="re-save the checkpoint with DeepSpeed")
    return [[(str(n), tuple(int(x) for x in s)) for n, s in g.items()] for g in shapes]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _unflatten_contiguous(flat: torch.Tensor, shapes: list[tuple[str, tuple[int, ...]]], d: Path) -> dict:
    total = sum(_numel(s) for _, s in shapes)
    if flat.numel() < total:
        raise CorruptFileError(f"{d}: a flat group holds {flat.numel()} elements, its parameters need {total}",
                               hint="copy every rank's optim_states file")
    out, offset = {}, 0
    for name, shape in shapes:
        n = _numel(shape)
        out[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return out


def _unflatten_per_param(parts: list[torch.Tensor], shapes: list[tuple[str, tuple[int, ...]]], d: Path) -> dict:
    world = len(parts)
    out, offset = {}, 0
    for name, shape in shapes:
        n = _numel(shape)
        chunk = -(-n // world)
        if any(p.numel() < offset + chunk for p in parts):
            raise CorruptFileError(f"{d}: the ZeRO-3 partitions end before parameter {name}",
                                   hint="copy every rank's optim_states file")
        out[name] = torch.cat([p[offset:offset + chunk] for p in parts])[:n].reshape(shape)
        offset += chunk
    return out


def _groups(d: Path, key: str | None) -> list[dict[str, torch.Tensor]]:
    """Per group, name -> tensor of the fp32 weights (``key`` None) or of one moment (``key`` = exp_avg ...)."""
    stage = zero_stage(d)
    shapes = _param_shapes(d)
    optim = _optim_states(d)
    if not optim:
        raise OptimizerStateError(f"{d}: no zero_pp_rank_*_optim_states.pt files", hint="copy every rank's file")
    out = []
    for g, group_shapes in enumerate(shapes):
        parts = []
        for sd in optim:
            if key is None:
                flat = sd.get("fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups")[g]
            else:
                base = sd.get("optimizer_state_dict" if stage == 3 else "base_optimizer_state") or {}
                flat = ((base.get("state") or {}).get(g) or {}).get(key)
            if not isinstance(flat, torch.Tensor):
                raise OptimizerStateError(f"{d}: group {g} has no flat {key or 'fp32 weights'} tensor",
                                          hint="an optimizer without Adam moments, or a damaged file")
            parts.append(flat.detach().reshape(-1))  # saved as nn.Parameter: plain data here
        if stage == 3:
            out.append(_unflatten_per_param(parts, group_shapes, d))
        else:
            out.append(_unflatten_contiguous(torch.cat(parts), group_shapes, d))
    return out


class _DictSource(TensorSource):
    """Tensors already in memory (reassembled ZeRO-3 partitions)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        super().__init__(path, "deepspeed")
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._t[name]
        except KeyError:
            raise self._missing(name) from None

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix == ".pt")

    def close(self) -> None:
        self._flat_cache = None


def open_tensors(ckpt: StoredCheckpoint | Path) -> TensorSource:
    """The model weights: ``module`` of the model states (ZeRO 0-2), or the fp32 partitions reassembled
    (ZeRO 3, with the module's buffers)."""
    from ckptaudit.io.formats import PickleSource

    d = checkpoint_path(ckpt)
    if zero_stage(d) < 3:
        return PickleSource(d / MODEL_STATES, "torch-zip")
    tensors: dict[str, torch.Tensor] = {}
    for group in _groups(d, None):
        tensors.update(group)
    states = model_states(d)
    module = states.get("module") if isinstance(states.get("module"), Mapping) else {}
    for name in states.get("buffer_names") or ():
        value = module.get(name)
        if isinstance(value, torch.Tensor) and value.numel():
            tensors[str(name)] = value
    return _DictSource(d, tensors)


def optimizer_state_dict(d: Path) -> dict:
    """A torch optimizer state dict (index-keyed, ``param_names`` in every group) of engine checkpoint ``d``."""
    d = Path(d)
    stage = zero_stage(d)
    states = model_states(d)
    if stage == 0:
        opt = states.get("optimizer")
        if not isinstance(opt, Mapping) or "state" not in opt:
            raise OptimizerStateError(f"{d}: the model states hold no optimizer state")
        return dict(opt)
    optim = _optim_states(d)
    base = optim[0].get("optimizer_state_dict" if stage == 3 else "base_optimizer_state") or {}
    base_groups = list(base.get("param_groups") or [])
    shapes = _param_shapes(d)
    if len(base_groups) != len(shapes):
        raise OptimizerStateError(f"{d}: {len(base_groups)} optimizer groups for {len(shapes)} param_shapes groups")
    moments = {key: _groups(d, key) for key in ("exp_avg", "exp_avg_sq")}
    raw_state, raw_groups, index = {}, [], 0
    for g, (group_shapes, hyper) in enumerate(zip(shapes, base_groups, strict=True)):
        names = [n for n, _ in group_shapes]
        ids = list(range(index, index + len(names)))
        index += len(names)
        raw_groups.append({**{k: v for k, v in hyper.items() if k != "params"}, "params": ids, "param_names": names})
        step_value = ((base.get("state") or {}).get(g) or {}).get("step")
        for i, name in zip(ids, names, strict=True):
            raw_state[i] = {"step": torch.as_tensor(step_value, dtype=torch.float32).clone(),
                            "exp_avg": moments["exp_avg"][g][name].clone(),
                            "exp_avg_sq": moments["exp_avg_sq"][g][name].clone()}
    return {"state": raw_state, "param_groups": raw_groups}


def scheduler_state_dict(d: Path) -> dict | None:
    """The LR scheduler state saved by the engine (``lr_scheduler``), or None."""
    value = model_states(Path(d)).get("lr_scheduler")
    return dict(value) if isinstance(value, Mapping) else None


def optimizer_dict(ckpt: StoredCheckpoint | Path) -> dict:
    """The stack-reader entry point of ``optimizer_state_dict``."""
    return optimizer_state_dict(checkpoint_path(ckpt))
