"""Lightning ``.ckpt`` files: one ``torch.save`` dict of epoch, global_step, state_dict, optimizer_states,
lr_schedulers, hyper_parameters, loops, callbacks (weights-only loadable when the hyper-parameters are plain).

- Weights: ``state_dict``, whose names carry the LightningModule attribute that holds the model
  (``model.transformer.h.0...`` for ``self.model``). The prefix is found by matching the stored names against the
  names of the model that the config builds (``io.keys.prefix_matching``), never guessed; the tensors are then
  exposed under the model's own names and whatever else the LightningModule holds (metrics, a loss module) is
  left out. Without a config the names stay as stored. A tied head stored twice is one tensor (PickleSource).
- Config: a config.json found beside the run (the checkpoints folder, the version folder or up to the
  default_root_dir), else a transformers config dict in ``hyper_parameters`` (``save_hyperparameters`` of a
  ``config`` argument, or the hyper-parameters themselves when they hold ``model_type``).
- Optimizer and scheduler: ``optimizer_states[0]`` and ``lr_schedulers[0]`` (io/optimizer.py reads them).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptaudit.io.keys import prefix_matching, strip_prefix
from ckptaudit.io.source import TensorSource
from ckptaudit.io.torchload import safe_torch_load
from ckptaudit.io.types import StoredCheckpoint, checkpoint_path


def _file(ckpt: StoredCheckpoint | Path) -> Path:
    return checkpoint_path(ckpt)


@functools.lru_cache(maxsize=4)
def _hparams(path: str, mtime_ns: int) -> Any:
    obj = safe_torch_load(Path(path))
    return obj.get("hyper_parameters") if isinstance(obj, Mapping) else None


def _config_from_hparams(hp: Any) -> dict | None:
    if not isinstance(hp, Mapping):
        return None
    if isinstance(hp.get("model_type"), str):
        return dict(hp)
    for value in hp.values():
        if isinstance(value, Mapping) and isinstance(value.get("model_type"), str):
            return dict(value)
    return None


def config(ckpt: Any) -> dict | None:
    """The model config of a Lightning checkpoint (see the module docstring), or None."""
    path = _file(ckpt)
    for folder in list(path.parents)[1:4]:  # version_N/, lightning_logs/, default_root_dir/
        if (folder / "config.json").is_file():
            try:
                data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data:
                return data
    return _config_from_hparams(_hparams(str(path), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _model_names(config_json: str) -> tuple[str, ...]:
    from ckptaudit.io.models import _build

    with torch.device("meta"):
        model = _build(json.loads(config_json), "config")
    return tuple(model.state_dict(keep_vars=True))


def open_tensors(ckpt: Any) -> TensorSource:
    """The state dict under the model's names when a config tells them, else as stored."""
    from ckptaudit.errors import CkptAuditError
    from ckptaudit.io.detect import detect_format
    from ckptaudit.io.formats import PickleSource

    path = _file(ckpt)
    src = PickleSource(path, detect_format(path))
    method = getattr(ckpt, "config", None)
    try:
        cfg = method() if callable(method) else config(path)
        names = _model_names(json.dumps(cfg, sort_keys=True, default=str)) if cfg else ()
    except CkptAuditError:
        names = ()  # a config the installed transformers cannot build: the stored names stay
    prefix = prefix_matching(src.keys(), names) if names else None
    return strip_prefix(src, prefix) if prefix else src


def model_source(source: TensorSource, ckpt: Any, model: torch.nn.Module) -> TensorSource:
    """``source`` under ``model``'s names: the module prefix matched against the model itself."""
    prefix = prefix_matching(source.keys(), model.state_dict(keep_vars=True))
    return strip_prefix(source, prefix or "")  # a view over ``source``'s names: remap() maps streams of them
