"""Runnable transformers models from checkpoints, parameter shapes on the meta device, hub ids from the cache.

Models are built from the checkpoint's config.json alone (never ``trust_remote_code``, never a download) and
filled tensor by tensor from its TensorSource, so memory stays at one model plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import (
    CorruptFileError,
    HubNotCachedError,
    InputNotFoundError,
    LayoutError,
    UnknownArchitectureError,
)

__all__ = ["param_shapes", "load_model", "resolve_model_path", "hub_cache_dir"]


# ------------------------------------------------------------------------------------------ building


def _config_dict(ckpt: Any) -> dict:
    method = getattr(ckpt, "config", None)
    config = method() if callable(method) else None
    if config is None and getattr(ckpt, "config_file", None) is not None:
        try:
            config = json.loads(Path(ckpt.config_file).read_text())
        except json.JSONDecodeError as exc:
            raise CorruptFileError(f"{ckpt.config_file}: invalid JSON ({exc})") from None
    if not config:
        raise LayoutError(
            f"{ckpt.path}: no config.json, so the model cannot be built",
            hint="save the model config next to the weights (model.config.save_pretrained(dir))",
        )
    return dict(config)


def _transformers_config(config: dict, where: Any) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UnknownArchitectureError(
            f"{where}: config.json model_type {model_type!r} is not known to the installed transformers",
            hint="upgrade transformers, or audit weights only (analyses that do not run the model)",
        )
    return CONFIG_MAPPING[model_type].from_dict(config)


def _build(config: dict, where: Any) -> torch.nn.Module:
    """The model class named by config 'architectures' when transformers has it, else the Auto classes."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

    hf_config = _transformers_config(config, where)
    for arch in config.get("architectures") or ():
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls._from_config(hf_config)
    try:
        return AutoModelForCausalLM.from_config(hf_config)
    except ValueError:  # encoder-only and other non-causal configs
        return AutoModel.from_config(hf_config)


def param_shapes(ckpt: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` of the model's trainable parameters in ``named_parameters()`` order.

    Built from the checkpoint's config.json on the meta device (no memory, no weights read). Tied weights
    appear once, as in ``named_parameters()`` (e.g. no ``lm_head.weight`` when tied to the embeddings).
    """
    config = _config_dict(ckpt)
    with torch.device("meta"):
        model = _build(config, ckpt.path)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(re.search(p, name) for p in patterns or ())


def _preview(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def load_model(
    ckpt: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """A transformers model built from ``ckpt``'s config.json and filled with its weights, in eval mode.

    ``device``: "cpu", "cuda", "cuda:1" or "auto"; ``dtype``: the parameters' dtype (None -> float32; stored
    bf16/fp16 weights are converted). Weights are copied one tensor at a time. Key checking is strict: weights
    the model expects but the files lack raise CorruptFileError, tensors the model has no place for raise
    LayoutError, both naming the tensors (the model's own ignore lists, e.g. GPT-2's ``attn.bias``, are honoured).
    """
    config = _config_dict(ckpt)
    device = _resolve_device(device)
    dtype = dtype or torch.float32
    previous = torch.get_default_dtype()
    try:
        # Built directly on the target device so non-persistent buffers (causal masks, rotary frequencies) get
        # their real values; the random initialisation is overwritten below.
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = _build(config, ckpt.path)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype=dtype)

    targets = model.state_dict(keep_vars=True)
    # Tied weights appear under several names but are one tensor: the file needs only one of them.
    aliases: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        aliases.setdefault(id(tensor), []).append(name)

    with ckpt.tensors() as source:
        stored = list(source.keys())
        stored_set = set(stored)
        unexpected = [
            k
            for k in stored
            if k not in targets and not _matches(k, model._keys_to_ignore_on_load_unexpected)
        ]
        missing = [
            names[0]
            for names in aliases.values()
            if not any(n in stored_set for n in names)
            and not all(_matches(n, model._keys_to_ignore_on_load_missing) for n in names)
        ]
        if unexpected:
            raise LayoutError(
                f"{ckpt.path}: tensors with no place in {type(model).__name__}: {_preview(unexpected)}",
                hint="check that config.json belongs to these weights (a prefixed state_dict needs re-saving)",
            )
        if missing:
            raise CorruptFileError(
                f"{ckpt.path}: weights {type(model).__name__} needs are missing from the files: {_preview(missing)}",
                hint="the checkpoint is incomplete (interrupted save or missing shard)",
            )
        present = [name for name in stored if name in targets]  # the rest is ignored by the model's own rules
        for name in present:  # shapes first (header reads only), so a mismatch costs no tensor data
            if tuple(source.shape(name)) != tuple(targets[name].shape):
                raise CorruptFileError(
                    f"{ckpt.path}: tensor {name} has shape {tuple(source.shape(name))}, "
                    f"the model expects {tuple(targets[name].shape)}",
                    hint="check that config.json belongs to these weights",
                )
        with torch.no_grad():
            for name in present:
                targets[name].copy_(source.get(name))
    return model.eval()


# ------------------------------------------------------------------------------------------ hub cache

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(@[\w.\-/]+)?$")


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The snapshot folder of ``repo_id`` in ``cache``; filesystem reads only, never the network."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    snapshots = repo / "snapshots"
    ref = revision or "main"
    ref_file = repo / "refs" / ref
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
        return snapshots / commit if (snapshots / commit).is_dir() else None
    if revision and (snapshots / revision).is_dir():  # a commit hash given directly
        return snapshots / revision
    if revision is None and snapshots.is_dir():
        # No refs/main (e.g. copied by hand): accept a single unambiguous snapshot.
        found = [p for p in snapshots.iterdir() if p.is_dir()]
        if len(found) == 1:
            return found[0]
    return None


def resolve_model_path(spec: str) -> Path:
    """A local file/directory for ``spec``: an existing path, or a hub id (``org/name[@revision]``) already cached.

    Looks only at the local cache (HF_HUB_CACHE / HF_HOME); there is no network call of any kind. A hub id that
    is not cached raises HubNotCachedError; a path-like spec that does not exist raises InputNotFoundError.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        raise InputNotFoundError(f"{spec}: no such file or directory")
    repo_id, _, revision = spec.partition("@")
    cache = hub_cache_dir()
    snapshot = _cached_snapshot(repo_id, revision or None, cache)
    if snapshot is None:
        raise HubNotCachedError(
            f"{spec}: no such local path, and not in the local cache at {cache}",
            hint=f"ckptaudit never downloads: run `huggingface-cli download {repo_id}` on a machine with access, "
            "or pass a local directory",
        )
    return snapshot
