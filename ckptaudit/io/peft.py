"""PEFT LoRA adapter runs: ``checkpoint-N/adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``
[r, in] and ``lora_B.weight`` [out, r]) with ``adapter_config.json`` (r, lora_alpha, use_rslora, alpha_pattern,
fan_in_fan_out, base_model_name_or_path), beside the Trainer's optimizer.pt over the adapter parameters only.

- Weights (the trajectory): the effective weight of each adapted module is W0 + s B A (transposed when
  ``fan_in_fan_out``, as GPT-2's Conv1D stores [in, out]), s = alpha / r (alpha / sqrt(r) with rsLoRA). W0 cancels
  in theta(t) - theta(anchor), so the tensors exposed are the merged deltas s B A, computed in float64, under
  the base module's weight names (``transformer.h.0.attn.c_attn.weight``), and zeros for the base weights the
  adapter leaves alone (their shapes from the base model's config): no base weights are read.
- Model (commands that run it): the base model, found by ``base_model_name_or_path`` (a folder beside the run,
  a local path, or a hub id in the local cache), filled with W0 + s B A; a missing base is one clear error.
- Optimizer state: the Trainer's optimizer.pt, keyed by the adapter parameter names in the order PEFT's model
  lists them (built with PEFT on the meta device, no weights read).
- Training model (resume-probe): the base model with its own weights W0, wrapped by PEFT's ``get_peft_model``
  with the checkpoint's adapter_config.json and the adapter weights loaded by PEFT's
  ``set_peft_model_state_dict``: the PeftModel the run trained, only the adapter parameters trainable; the
  optimizer state is re-keyed to its parameter names (``...lora_A.default.weight``).

DoRA, embedding LoRA and adapters other than LoRA are refused with one line naming the tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import (
    CorruptFileError,
    HubNotCachedError,
    InputNotFoundError,
    LayoutError,
    OptimizerStateError,
)
from ckptaudit.io.source import TensorSource
from ckptaudit.io.tensors import open_tensors as _open_file
from ckptaudit.io.types import StoredCheckpoint, checkpoint_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def adapter_file(d: Path) -> Path | None:
    """The adapter weights file of folder ``d`` when it is a PEFT adapter folder, else None."""
    d = Path(d)
    if not (d / ADAPTER_CONFIG).is_file():
        return None
    return next((d / n for n in ADAPTER_FILES if (d / n).is_file()), None)


def _dir(ckpt: StoredCheckpoint | Path) -> Path:
    p = checkpoint_path(ckpt)
    return p if p.is_dir() else p.parent


@functools.lru_cache(maxsize=16)
def _adapter_config(path: str, mtime_ns: int) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: invalid JSON ({exc})", hint="re-save the adapter") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: not a JSON object", hint="re-save the adapter")
    return data


def adapter_config(ckpt: Any) -> dict:
    """The parsed adapter_config.json of the checkpoint."""
    path = _dir(ckpt) / ADAPTER_CONFIG
    cfg = _adapter_config(str(path), path.stat().st_mtime_ns)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LayoutError(f"{path}: a {cfg.get('peft_type')} adapter; ckptaudit reads LoRA adapters",
                          hint="merge it into the base model (merge_and_unload) and audit the merged checkpoints")
    if cfg.get("use_dora"):
        raise LayoutError(f"{path}: a DoRA adapter: its effective weight is not W0 + s B A",
                          hint="merge it into the base model (merge_and_unload) and audit the merged checkpoints")
    return cfg


def base_model_path(ckpt: Any) -> Path:
    """The base model folder named by ``base_model_name_or_path``: a folder of that name in the adapter folder or
    up to two folders above it, a path (absolute or from the working directory), or a hub id in the local
    cache. HubNotCachedError / InputNotFoundError name the value and the fix."""
    from ckptaudit.io.models import resolve_model_path

    name = adapter_config(ckpt).get("base_model_name_or_path")
    folder = _dir(ckpt)
    if not isinstance(name, str) or not name:
        raise LayoutError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path, so the base model is unknown",
                          hint="set base_model_name_or_path to the base model's folder or hub id")
    for above in (folder, folder.parent, folder.parent.parent):
        if (above / name).is_dir() and (above / name / "config.json").is_file():
            return (above / name).resolve()
    try:
        return resolve_model_path(name)
    except (HubNotCachedError, InputNotFoundError) as exc:
        raise type(exc)(f"{folder}: the base model {name!r} of this adapter is not available ({exc.message})",
                        hint=f"put the base model's folder beside the run, or `hf download {name}` on a machine "
                        "with access (ckptaudit never downloads)") from None


def config(ckpt: Any) -> dict | None:
    """The base model's config.json (the adapter's own folder has none)."""
    path = base_model_path(ckpt) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: the base model has no config.json", hint="re-save the base model") from None
    return data if isinstance(data, dict) else None


def _scale(cfg: dict, module: str, r: int) -> float:
    alpha = cfg.get("lora_alpha", 8)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
            break
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


class DeltaSource(TensorSource):
    """The merged LoRA deltas s B A of one adapter checkpoint, float64, under the base weights' names.

    ``base_shapes`` (the base model's weights, name -> shape, in its order): every other weight of the base is
    exposed too, as zeros (it does not move), so that the trajectory is the whole model's, as merged checkpoints
    would give it. Without them only the adapted weights are exposed."""

    def __init__(self, folder: Path, cfg: dict, base_shapes: dict[str, tuple[int, ...]] | None = None):
        file = adapter_file(folder)
        super().__init__(file, "peft")
        self._src = _open_file(file)
        self._cfg = cfg
        pairs: dict[str, dict[str, str]] = {}
        for key in self._src.keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _LORA_RE.match(name)
            if m is None:
                raise LayoutError(f"{file}: tensor {key!r} is not a LoRA A/B weight (modules_to_save, embedding "
                                  "LoRA or bias adapters are not read)",
                                  hint="merge the adapter into the base model and audit the merged checkpoints")
            pairs.setdefault(m.group("module"), {})[m.group("part")] = key
        self._pairs: dict[str, tuple[str, str]] = {}
        for module, parts in pairs.items():
            if set(parts) != {"A", "B"}:
                raise CorruptFileError(f"{file}: {module} has lora_{next(iter(parts))} without its pair",
                                       hint="re-save the adapter")
            self._pairs[module + ".weight"] = (parts["A"], parts["B"])
        self._zeros = {n: tuple(s) for n, s in (base_shapes or {}).items() if n not in self._pairs}
        order = list(base_shapes or ()) + [n for n in self._pairs if n not in (base_shapes or {})]
        self._keys = order

    def keys(self) -> list[str]:
        return list(self._keys)

    def adapted(self) -> list[str]:
        """The weights the adapter changes (the rest are zeros)."""
        return list(self._pairs)

    def _ab(self, name: str) -> tuple[str, str]:
        if name in self._zeros:
            raise KeyError(name)
        try:
            return self._pairs[name]
        except KeyError:
            raise self._missing(name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._zeros:
            return self._zeros[name]
        a, b = self._ab(name)
        out, into = self._src.shape(b)[0], self._src.shape(a)[1]
        return (into, out) if self._cfg.get("fan_in_fan_out") else (out, into)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float64

    def get(self, name: str) -> torch.Tensor:
        if name in self._zeros:
            return torch.zeros(self._zeros[name], dtype=torch.float64)
        a, b = self._ab(name)
        A, B = self._src.get(a).double(), self._src.get(b).double()
        if B.shape[1] != A.shape[0]:
            raise CorruptFileError(f"{self.path}: {b} {tuple(B.shape)} and {a} {tuple(A.shape)} do not multiply")
        delta = _scale(self._cfg, name[: -len(".weight")], A.shape[0]) * (B @ A)
        return delta.t().contiguous() if self._cfg.get("fan_in_fan_out") else delta

    def files(self) -> list[Path]:
        return [Path(self.path)]

    def close(self) -> None:
        self._flat_cache = None
        self._src.close()


def _base_shapes(config_dict: dict) -> dict[str, tuple[int, ...]]:
    from ckptaudit.io.models import _build, tied_groups

    with torch.device("meta"):
        model = _build(config_dict, "config")
    tied = {n for group in tied_groups(config_dict) for n in group[1:]}
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in tied}


def open_tensors(ckpt: Any) -> TensorSource:
    """The merged deltas of the adapter checkpoint, with zeros for the base weights it leaves alone when the
    base model's config is available (see the module docstring)."""
    from ckptaudit.errors import CkptAuditError

    try:
        method = getattr(ckpt, "config", None)
        cfg = method() if callable(method) else config(ckpt)
        shapes = _base_shapes(cfg) if cfg else None
    except CkptAuditError:
        shapes = None  # no base model here: the adapted weights alone
    return DeltaSource(_dir(ckpt), adapter_config(ckpt), shapes)


class _MergedView(TensorSource):
    """The base model's tensors with the adapter's deltas added: W0 + s B A for adapted weights."""

    def __init__(self, base: TensorSource, deltas: TensorSource):
        super().__init__(Path(base.path), base.format)
        self._base, self._deltas = base, deltas
        self._adapted = set(deltas.adapted() if hasattr(deltas, "adapted") else deltas.keys())
        missing = sorted(self._adapted - set(base.keys()))
        if missing:
            raise LayoutError(f"{deltas.path}: the base model has no weight {missing[0]} for the adapter",
                              hint="base_model_name_or_path names another model than the adapter was trained on")

    def keys(self) -> list[str]:
        return self._base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._base.dtype(name)

    def _merge(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        w0 = self._base.get(name)
        return (w0.double() + delta.double()).to(w0.dtype)

    def get(self, name: str) -> torch.Tensor:
        if name in self._adapted:
            return self._merge(name, self._deltas.get(name))
        return self._base.get(name)

    def remap(self, pairs: Any) -> Any:
        """A stream of (delta name, delta) pairs (a predicted trajectory point) as full model tensors: W0 + delta
        for the adapted weights, then the base model's other tensors."""
        done = set()
        for name, delta in pairs:
            done.add(name)
            yield name, self._merge(name, delta)
        for name in self._base.keys():
            if name not in done:
                yield name, self._base.get(name)

    def files(self) -> list[Path]:
        return self._base.files() + self._deltas.files()

    def close(self) -> None:
        self._flat_cache = None
        self._base.close()
        self._deltas.close()


def model_source(source: TensorSource, ckpt: Any, model: torch.nn.Module) -> TensorSource:
    """The model's tensors: the base model's weights with the adapter merged in."""
    return _MergedView(_open_file(base_model_path(ckpt)), source)


@contextlib.contextmanager
def _offline() -> Any:
    """HF_HUB_OFFLINE=1 while PEFT runs: it would otherwise look base model names up on the hub."""
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline


def _peft_config(folder: Path) -> Any:
    """PEFT's own config object of the adapter folder, as it was trained (the adapter parameters require grad)."""
    from peft import PeftConfig

    with _offline():
        peft_config = PeftConfig.from_pretrained(str(folder))
    peft_config.inference_mode = False
    return peft_config


def _file_name(name: str) -> str:
    """A PeftModel parameter name under the adapter file's naming (the adapter's name dropped)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)


def param_shapes(ckpt: Any) -> list[tuple[str, tuple[int, ...]]]:
    """The adapter parameters in the order PEFT's model lists them (requires_grad), under the file's names."""
    import warnings

    from peft import get_peft_model

    from ckptaudit.io.models import _build

    folder = _dir(ckpt)
    peft_config = _peft_config(folder)
    with _offline(), torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that the meta model has no name_or_path
        model = get_peft_model(_build(config(ckpt), folder), peft_config)
    return [(_file_name(n), tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


class _Base:
    """The base model folder as ``io.models.load_model`` takes a checkpoint: its config and its tensors."""

    layout = None

    def __init__(self, path: Path):
        self.path = path

    def config(self) -> dict:
        from ckptaudit.io.jsonio import read_json

        return read_json(self.path / "config.json", expect=None, hint="re-save the base model")

    def tensors(self) -> TensorSource:
        return _open_file(self.path)


def training_model(ckpt: Any, device: Any = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model the adapter run trained, in eval mode: the base model (``base_model_name_or_path``) filled with
    its own weights, wrapped by PEFT's ``get_peft_model`` with the checkpoint's adapter_config.json, and the
    checkpoint's adapter weights (read weights-only by ckptaudit) loaded by PEFT's ``set_peft_model_state_dict``.
    Only the adapter parameters require grad. A base model whose modules the adapter does not find, or an adapter
    file with tensors the model has no place for, is a LayoutError naming them."""
    import warnings

    from peft import get_peft_model, set_peft_model_state_dict

    from ckptaudit.io.models import load_model

    folder = _dir(ckpt)
    adapter_config(ckpt)  # refuses DoRA and non-LoRA adapters with one line
    base = load_model(_Base(base_model_path(ckpt)), device=device, dtype=dtype)
    try:
        with _offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, _peft_config(folder))
    except ValueError as exc:  # "Target modules ... not found in the base model"
        raise LayoutError(f"{folder / ADAPTER_CONFIG}: PEFT cannot wrap the base model ({str(exc).splitlines()[0]})",
                          hint="base_model_name_or_path names another model than the adapter was trained on") from None
    file = adapter_file(folder)
    with _open_file(file) as src:
        weights = {k: src.get(k) for k in src.keys()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        what = (f"tensor {result.unexpected_keys[0]!r} has no place in the adapter" if result.unexpected_keys
                else f"the adapter parameter {missing[0]!r} is not in the file")
        raise LayoutError(f"{file}: {what}", hint="the adapter file and adapter_config.json do not belong together")
    return model.eval()


def optimizer_to_model(state: Any, params: Any) -> Any:
    """The adapter's OptimizerState (keyed by the file's names) re-keyed for ``params``, the named_parameters of
    the PeftModel that ``training_model`` builds (``...lora_A.default.weight``); order and tensors unchanged.
    The merged model (no adapter parameters) cannot take it: resuming it would be a full fine-tune."""
    import dataclasses

    names = {_file_name(n): n for n, _ in params}
    have = [n for group in state.names for n in group]
    if not any(".lora_" in n for n, _ in params):
        raise OptimizerStateError(
            f"{state.source}: a LoRA adapter run: the optimizer state belongs to the adapter parameters, and resuming "
            "the merged model would be a full fine-tune",
            hint="resume-probe resumes the adapter (the base wrapped by PEFT); give it the checkpoint folder")
    if sorted(names) != sorted(have) or len(names) != len(params):
        odd = sorted(set(names) ^ set(have))
        raise OptimizerStateError(
            f"{state.source}: the optimizer state's adapter parameters differ from the model's ({', '.join(odd[:4])})",
            hint="the optimizer state does not belong to this adapter")
    new_state = {names[n]: dataclasses.replace(st, name=names[n]) for n, st in state.state.items()}
    return dataclasses.replace(state, names=tuple(tuple(names[n] for n in group) for group in state.names),
                               state=new_state, mapping=state.mapping + " (adapter parameters of the PeftModel)")
