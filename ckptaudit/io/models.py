"""Runnable transformers models from checkpoints, parameter shapes on the meta device, hub ids from the cache.

Models are built from the checkpoint's config.json alone (never ``trust_remote_code``, never a download) and
filled tensor by tensor from its TensorSource, so memory stays at one model plus one tensor. A GGUF file carries
its own config and tokenizer as metadata: it is loaded through transformers' GGUF support and dequantised to float.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import (
    CorruptFileError,
    DataError,
    HubNotCachedError,
    InputNotFoundError,
    LayoutError,
    UnknownArchitectureError,
)
from ckptaudit.io.keys import model_key_renamer
from ckptaudit.io.source import TensorSource

__all__ = ["param_shapes", "load_model", "load_training_model", "fill_model", "load_tokenizer", "has_tokenizer", "max_positions", "TOKENIZER_FILES",
           "resolve_model_path", "hub_cache_dir"]


# ------------------------------------------------------------------------------------------ building


def _config_dict(ckpt: Any) -> dict:
    method = getattr(ckpt, "config", None)
    config = method() if callable(method) else None
    if config is None and getattr(ckpt, "config_file", None) is not None:
        from ckptaudit.io.jsonio import read_json

        config = read_json(ckpt.config_file, expect=None, hint=_CONFIG_HINT)
    if config is None:
        raise LayoutError(
            f"{ckpt.path}: no config.json, so the model cannot be built",
            hint="save the model config next to the weights (model.config.save_pretrained(dir))",
        )
    if not isinstance(config, Mapping) or not config:
        what = "is empty ({})" if isinstance(config, Mapping) else f"holds a {type(config).__name__}, not an object"
        raise CorruptFileError(
            f"{ckpt.path}: config.json {what}, so the model cannot be built",
            hint=_CONFIG_HINT,
        )
    return dict(config)


_CONFIG_HINT = "re-save the model config next to the weights (model.config.save_pretrained(dir))"
# Out of memory is not a fault of config.json: it propagates as is.
_NOT_CONFIG_ERRORS = (MemoryError, torch.OutOfMemoryError)


def _transformers_config(config: dict, where: Any) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnknownArchitectureError(
            f"{where}: config.json model_type {model_type!r} is not known to the installed transformers",
            hint="upgrade transformers, or audit weights only (analyses that do not run the model)",
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as exc:  # ValueError/TypeError, huggingface_hub's StrictDataclassFieldValidationError...
        raise CorruptFileError(
            f"{where}: config.json is not a valid {model_type} config ({_one_line(exc)})", hint=_CONFIG_HINT
        ) from None


def _build(config: dict, where: Any) -> torch.nn.Module:
    """The model class named by config 'architectures' when transformers has it, else the Auto classes."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

    hf_config = _transformers_config(config, where)
    architectures = config.get("architectures")
    try:
        for arch in architectures if isinstance(architectures, list) else ():
            cls = getattr(transformers, str(arch), None)
            if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
                return cls._from_config(hf_config)
        try:
            return AutoModelForCausalLM.from_config(hf_config)
        except ValueError:  # encoder-only and other non-causal configs
            return AutoModel.from_config(hf_config)
    except _NOT_CONFIG_ERRORS:
        raise
    except Exception as exc:  # values transformers accepted but the model cannot be built with (e.g. n_embd < 0)
        raise CorruptFileError(
            f"{where}: no model can be built from config.json ({_one_line(exc)})", hint=_CONFIG_HINT
        ) from None


def param_shapes(ckpt: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` of the model's trainable parameters in ``named_parameters()`` order.

    Built from the checkpoint's config.json on the meta device (no memory, no weights read). Tied weights
    appear once, as in ``named_parameters()`` (e.g. no ``lm_head.weight`` when tied to the embeddings).
    """
    config = _config_dict(ckpt)
    with torch.device("meta"):
        model = _build(config, ckpt.path)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]


@functools.lru_cache(maxsize=16)
def _tied_groups(config_json: str) -> tuple[tuple[str, ...], ...]:
    with torch.device("meta"):
        model = _build(json.loads(config_json), "config")
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


def tied_groups(config: Mapping) -> tuple[tuple[str, ...], ...]:
    """Names that are one tensor in the model a config.json dict builds (e.g. a head tied to the embeddings),
    each group in ``state_dict()`` order; built on the meta device."""
    return _tied_groups(json.dumps(dict(config), sort_keys=True, default=str))


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
    bf16/fp16 weights are converted). Weights are copied one tensor at a time by ``fill_model``, whose checks are
    strict: weights the model expects but the files lack raise CorruptFileError, tensors the model has no place
    for raise LayoutError, a shape mismatch raises CorruptFileError, each naming the tensors (the model's own
    ignore lists, e.g. GPT-2's ``attn.bias``, are honoured).

    A checkpoint with layout "gguf" (a single .gguf file) is loaded as a causal LM through transformers' GGUF
    support, its config read from the file's metadata and its tensors dequantised to ``dtype``.
    """
    if getattr(ckpt, "layout", None) == "gguf":
        return _load_gguf_model(Path(ckpt.path), _resolve_device(device), dtype or torch.float32)
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

    opener = getattr(ckpt, "model_tensors", None)  # a stack's names and layout mapped to the model's
    with (opener(model) if callable(opener) else ckpt.tensors()) as source:
        fill_model(model, source, ckpt.path)
    return model.eval()


def load_training_model(
    ckpt: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The model as the run trained it, in eval mode: for a stack whose reader builds it (a PEFT adapter run:
    the base model wrapped by PEFT with the checkpoint's adapter, only the adapter parameters requiring grad),
    that model; else ``load_model`` (every parameter trainable)."""
    from ckptaudit.io.discover import stack_reader

    reader = stack_reader(getattr(ckpt, "layout", "") or "")
    if reader is not None and hasattr(reader, "training_model"):
        return reader.training_model(ckpt, device=_resolve_device(device), dtype=dtype or torch.float32)
    return load_model(ckpt, device=device, dtype=dtype)


def fill_model(model: torch.nn.Module, tensors: Any, where: Any = "tensors") -> torch.nn.Module:
    """Copy ``tensors`` into ``model``'s parameters and buffers in place, one tensor at a time; returns ``model``.

    ``tensors``: an open TensorSource, a mapping name -> tensor, or an iterable of ``(name, tensor)`` pairs (a
    stream: each pair is checked and copied as it comes, so only one tensor need exist at a time). Values are
    converted to each target's dtype and device by ``copy_``. ``where`` (the file or checkpoint the tensors come
    from) starts every error message. Checks are strict, each a one-line error naming the tensors:

    - a tensor the model has no place for -> LayoutError;
    - a weight the model needs that ``tensors`` lacks -> CorruptFileError;
    - a tensor whose shape differs from the model's -> CorruptFileError naming both shapes.

    The model's own ignore lists (``_keys_to_ignore_on_load_unexpected`` / ``_missing``, e.g. GPT-2's
    ``attn.bias``) are honoured, and tied weights (one tensor under several names, e.g. a head tied to the
    embeddings) need only one of their names. A source or a mapping is checked in full (names, then shapes from
    the headers) before anything is copied; a stream tensor by tensor, its missing names once it is exhausted.
    Stored names are first mapped to the model's as transformers maps them when loading (``io.keys``:
    GPT-NeoX's ``embed_out.weight`` -> ``lm_head.weight``, a missing or extra base-model prefix...).
    """
    targets = model.state_dict(keep_vars=True)
    # Tied weights appear under several names but are one tensor: the file needs only one of them.
    aliases: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        aliases.setdefault(id(tensor), []).append(name)
    ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None)
    # Buffers the model keeps out of its state dict (persistent=False, e.g. BERT's position_ids) but older
    # transformers saved: the model rebuilds them itself, so a stored copy is skipped, not an error.
    rebuilt = {n for n, _ in model.named_buffers()} - set(targets)
    kind = type(model).__name__

    def check_unexpected(names: list[str]) -> None:
        unexpected = [k for k in names if k not in targets and k not in rebuilt
                      and not _matches(k, ignore_unexpected)]
        if unexpected:
            raise LayoutError(
                f"{where}: tensors with no place in {kind}: {_preview(unexpected)}",
                hint="check that config.json belongs to these weights (a prefixed state_dict needs re-saving)",
            )

    def check_missing(given: set[str]) -> None:
        missing = [
            names[0]
            for names in aliases.values()
            if not any(n in given for n in names) and not all(_matches(n, ignore_missing) for n in names)
        ]
        if missing:
            raise CorruptFileError(
                f"{where}: weights {kind} needs are missing from the files: {_preview(missing)}",
                hint="the checkpoint is incomplete (interrupted save or missing shard)",
            )

    def check_shape(name: str, shape: Iterable[int]) -> None:
        if tuple(shape) != tuple(targets[name].shape):
            raise CorruptFileError(
                f"{where}: tensor {name} has shape {tuple(shape)}, the model expects {tuple(targets[name].shape)}",
                hint="check that config.json belongs to these weights",
            )

    rename = model_key_renamer(model)
    if isinstance(tensors, (TensorSource, Mapping)):
        stored: dict[str, str] = {}  # the model's name -> the stored name
        for key in tensors.keys():
            name = rename(key)
            if name in stored:
                raise LayoutError(f"{where}: tensors {stored[name]} and {key} both load into {name} of {kind}",
                                  hint="keep one of them (a state dict saved twice under two names?)")
            stored[name] = key
        shared = getattr(tensors, "aliases", None)
        for key, kept in (shared() if callable(shared) else {}).items():
            name = rename(key)  # one storage under two names: the second name gets the same tensor
            if name in targets and name not in stored and kept in set(stored.values()):
                stored[name] = kept
        check_unexpected(list(stored))
        check_missing(set(stored))
        present = [name for name in stored if name in targets]  # the rest is ignored by the model's own rules
        shape_of = tensors.shape if isinstance(tensors, TensorSource) else (lambda n: tensors[n].shape)
        for name in present:  # shapes first (header reads only), so a mismatch costs no tensor data
            check_shape(name, shape_of(stored[name]))
        with torch.no_grad():
            for name in present:
                targets[name].copy_(tensors.get(stored[name]) if isinstance(tensors, TensorSource)
                                    else tensors[stored[name]])
        return model

    given: set[str] = set()
    with torch.no_grad():
        for key, tensor in tensors:
            name = rename(key)
            check_unexpected([name])
            given.add(name)
            if name in targets:
                check_shape(name, tensor.shape)
                targets[name].copy_(tensor)
    check_missing(given)
    return model


# ------------------------------------------------------------------------------------------ GGUF


def _gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file, or None when it has none."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path), "r").fields.get("general.architecture")
    except Exception as exc:  # gguf raises ValueError/struct errors on damaged headers
        raise CorruptFileError(f"{path}: not a readable GGUF file ({exc})") from None
    return str(field.contents()) if field is not None else None


def _gguf_supported() -> list[str]:
    """The GGUF architectures the installed transformers can turn into a model."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        names.update(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})


def _gguf_arch_known(arch: str, supported: list[str]) -> bool:
    # llama.cpp spells some names without the underscore or with a hyphen (qwen2moe, gpt-oss)
    spellings = {a for s in supported for a in (s, s.replace("_", "-"), s.replace("_", ""))}
    return arch in spellings


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def _check_gguf_arch(path: Path) -> list[str]:
    """The supported GGUF architectures; UnknownArchitectureError/CorruptFileError when ``path``'s is not one."""
    arch = _gguf_architecture(path)
    supported = _gguf_supported()
    if arch is None:
        raise CorruptFileError(
            f"{path}: GGUF metadata has no general.architecture, so no model can be built",
            hint="re-export the model with llama.cpp's convert_hf_to_gguf.py",
        )
    if not _gguf_arch_known(arch, supported):
        raise UnknownArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported by the installed transformers "
            f"(supported: {', '.join(supported)})",
            hint="use the original Hugging Face model directory, or upgrade transformers",
        )
    return supported


@contextlib.contextmanager
def _quiet_transformers():
    """No transformers warnings or progress bars on stderr: failures become ckptaudit errors instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)


def _load_gguf_model(path: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM from a GGUF file (local only, dequantised to ``dtype``), on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    supported = _check_gguf_arch(path)
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path.parent),
                gguf_file=path.name,
                dtype=dtype,
                local_files_only=True,
                output_loading_info=True,
            )
    except Exception as exc:  # ValueError/KeyError/NotImplementedError/OSError variants from the GGUF loader
        raise UnknownArchitectureError(
            f"{path}: transformers could not build a causal LM from this GGUF ({_one_line(exc)})",
            hint=f"supported GGUF architectures: {', '.join(supported)}; "
            "or pass the original Hugging Face model directory",
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CorruptFileError(
            f"{path}: weights {type(model).__name__} needs are missing from the GGUF file: {_preview(missing)}",
            hint="the file is incomplete or was exported from a different architecture",
        )
    return model.to(device).eval()


# Files any saved Hugging Face tokenizer has at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "merges.txt", "sentencepiece.bpe.model")


def has_tokenizer(folder: Path | str) -> bool:
    """Whether ``folder`` holds saved tokenizer files (any of TOKENIZER_FILES); reads no file."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def max_positions(config: Mapping | None) -> int | None:
    """The model's maximum sequence length from a config.json dict (first positive int among the usual keys)."""
    if not isinstance(config, Mapping):
        return None
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def load_tokenizer(path: Path | str) -> Any:
    """The tokenizer of a model: saved in (or beside) a model directory, or in a GGUF file's metadata.

    A directory, or a weight file inside one, reads the tokenizer files there; a ``.gguf`` file builds the
    tokenizer from its ``tokenizer.ggml.*`` metadata. Local files only, never a download; failure -> DataError.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    gguf_file = path.is_file() and _is_gguf_file(path)
    folder = path if path.is_dir() else path.parent
    if not gguf_file and not has_tokenizer(folder):
        # transformers 5 would build an empty tokenizer from config.json alone; refuse instead of tokenizing to [].
        raise DataError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)",
            "save the tokenizer beside the model (tokenizer.save_pretrained(DIR))",
        )
    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variants for a missing tokenizer
        if gguf_file:
            _check_gguf_arch(path)  # an unsupported architecture is the better message
            raise DataError(
                f"{path}: no usable tokenizer in the GGUF metadata ({_one_line(e)})",
                "re-export with llama.cpp's convert_hf_to_gguf.py (it embeds tokenizer.ggml.*), "
                "or pass the original Hugging Face model directory",
            ) from None
        raise DataError(
            f"{folder}: no usable tokenizer ({_one_line(e)})",
            "save the tokenizer beside the model (tokenizer.save_pretrained(DIR))",
        ) from None


def _is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


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
            hint=f"ckptaudit never downloads: run `hf download {repo_id}` on a machine with access, "
            "or pass a local directory",
        )
    return snapshot
