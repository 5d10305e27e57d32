"""torch.distributed.checkpoint (DCP) folders, read safely and one tensor at a time.

A DCP folder is ``.metadata`` (a pickle of ``torch.distributed.checkpoint.metadata.Metadata``) plus
``__{rank}_{i}.distcp`` data files. torch reads ``.metadata`` with plain ``pickle.load``, so an untrusted folder
could run code the moment it is opened. Here ``.metadata`` is parsed by ``read_dcp_metadata`` with a restricted
unpickler that can build only the metadata classes, ``torch.Size``, dtypes and paths; everything else raises
UnsafePickleError before it is called. Tensor data is then loaded through ``dcp.load`` with a reader whose
metadata comes from that restricted parse (torch reads tensor bytes with ``torch.load(weights_only=True)``).
Non-tensor items (pickled bytes) are never requested.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError, InputNotFoundError, UnsafePickleError
from ckptaudit.io.source import STATE_DICT_KEYS, TensorSource

# (module, name) pairs the metadata pickle may reference. All are plain data holders or lookups: constructing
# them with attacker-chosen arguments does nothing beyond building the object.
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint._hf_utils": frozenset({"_HFStorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # a dict lookup of torch.layout by name
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "tuple", "list", "dict", "slice", "complex"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in _ALLOWED (plus torch dtypes)."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._path}: refused to unpickle: it needs the global {module}.{name}, which is not part of "
            "torch.distributed.checkpoint metadata; none of its code was run",
            hint="this DCP folder was not written by torch.distributed.checkpoint.save; do not load it with torch",
        )


def read_dcp_metadata(directory: Path | str) -> Any:
    """The ``Metadata`` object of a DCP folder, parsed with the restricted unpickler (no code from the file runs).

    Raises InputNotFoundError when ``.metadata`` is missing, UnsafePickleError when it references anything
    outside the metadata classes, CorruptFileError when it is not a Metadata pickle.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise InputNotFoundError(f"{path}: missing", hint="a DCP folder needs the .metadata written by dcp.save")
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file is "corrupt"
        raise CorruptFileError(f"{path}: not a readable DCP metadata pickle ({exc})", hint="re-save the checkpoint") from None
    if not isinstance(meta, Metadata):
        raise CorruptFileError(f"{path}: holds a {type(meta).__name__}, not DCP Metadata", hint="re-save the checkpoint")
    return meta


def _safe_reader(directory: Path, meta: Any) -> Any:
    """A FileSystemReader whose ``read_metadata`` returns the already safely-parsed ``meta``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return _Reader(str(directory))


# Top-level subtrees of training state beside the model's own tensors (torchtitan flattens the model into the top
# level and keeps these apart): never model weights.
TRAINING_STATE_SUBTREES = frozenset({"optimizer", "optimizers", "lr_scheduler", "lr_schedulers", "scheduler",
                                     "dataloader", "data_loader", "train_state", "ft_state", "rng", "rng_state"})


class DCPSource(TensorSource):
    """The model tensors of a DCP folder.

    Which tensors are the model's: the original key path of each item is in ``Metadata.planner_data``. When the
    checkpoint nests a state dict under one of STATE_DICT_KEYS (``{"model": model.state_dict(), "optimizer":
    ...}``, as Accelerate and FSDP write), only that subtree is exposed, with the prefix removed ("model.a.weight"
    -> "a.weight"). Otherwise every tensor is exposed under its flattened name, except those of the training-state
    subtrees (TRAINING_STATE_SUBTREES: torchtitan's ``optimizer``, ``lr_scheduler``, ``dataloader``,
    ``train_state`` beside the model's top-level names).
    """

    def __init__(self, directory: Path, tied: Any = ()):
        super().__init__(directory, "dcp")
        self._tied = [tuple(group) for group in tied]
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self._meta = read_dcp_metadata(directory)
        items = {k: v for k, v in self._meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        planner = self._meta.planner_data if isinstance(self._meta.planner_data, dict) else {}
        paths = {k: tuple(planner.get(k, (k,))) for k in items}
        prefix = next(
            (p for p in STATE_DICT_KEYS if any(len(v) > 1 and v[0] == p for v in paths.values())), None
        )
        self._names: dict[str, str] = {}  # exposed name -> flattened DCP key
        for key, kp in paths.items():
            if prefix is None:
                if not (len(kp) > 1 and kp[0] in TRAINING_STATE_SUBTREES):
                    self._names[key] = key
            elif len(kp) > 1 and kp[0] == prefix:
                self._names[".".join(map(str, kp[1:]))] = key
        self._items = items
        # DCP writes a tied tensor once per name (two byte ranges): the later names of a group the model ties are
        # the same parameter, exposed once like the safetensors copy of the same model.
        self._aliases: dict[str, str] = {}
        for group in self._tied:
            present = [n for n in group if n in self._names]
            for name in present[1:]:
                self._aliases[name] = present[0]
                del self._names[name]

    def aliases(self) -> dict[str, str]:
        """Names left out of ``keys()`` because the model ties them to an earlier name: {left out: kept}."""
        return dict(self._aliases)

    def _item(self, name: str) -> tuple[str, Any]:
        try:
            key = self._names[name]
        except KeyError:
            raise self._missing(name) from None
        return key, self._items[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._item(name)[1].size)

    def dtype(self, name: str) -> torch.dtype:
        return self._item(name)[1].properties.dtype

    def get(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        key, md = self._item(name)
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        with warnings.catch_warnings():
            # dcp warns that no process group exists: reading in one process is exactly what is wanted.
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.load({key: out}, storage_reader=_safe_reader(self.path, self._meta), no_dist=True)
            except FileNotFoundError as exc:
                raise InputNotFoundError(f"{self.path}: a data file is missing ({exc.filename})",
                                         hint="copy every __*.distcp file with .metadata") from None
            except Exception as exc:  # noqa: BLE001 - torch wraps reader failures in CheckpointException
                raise CorruptFileError(f"{self.path}: cannot read tensor {name!r} ({str(exc).splitlines()[0]})",
                                       hint="re-save the checkpoint") from None
        return out

    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.distcp"))

    def close(self) -> None:
        self._names = {}


# ------------------------------------------------------------------------------------------ training state


def has_subtree(directory: Path | str, head: str) -> bool:
    """Whether the DCP folder holds items under the top-level key ``head`` (from the metadata alone)."""
    meta = read_dcp_metadata(directory)
    planner = meta.planner_data if isinstance(meta.planner_data, dict) else {}
    return any(isinstance(kp, tuple) and len(kp) > 1 and kp[0] == head for kp in planner.values())


def _read_bytes_item(directory: Path, meta: Any, key: str) -> Any:
    """A non-tensor item (torch.save bytes inside a .distcp file), loaded weights-only from its byte range."""
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex

    info = meta.storage_data.get(MetadataIndex(key)) if isinstance(meta.storage_data, dict) else None
    if info is None or getattr(info, "transform_descriptors", None):
        raise CorruptFileError(f"{directory}: item {key!r} has no plain byte range in the data files",
                               hint="re-save the checkpoint without storage transforms")
    path = Path(directory) / str(info.relative_path)
    if path.parent.resolve() != Path(directory).resolve():
        raise CorruptFileError(f"{directory}: item {key!r} points outside the checkpoint folder")
    try:
        with open(path, "rb") as f:
            f.seek(int(info.offset))
            raw = f.read(int(info.length))
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: missing", hint="copy every __*.distcp file with .metadata") from None
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"{path}: item {key!r} needs more than weights-only loading allows "
                                f"({str(exc).splitlines()[0][:120]}); none of its code was run") from None
    except Exception as exc:  # noqa: BLE001 - a damaged byte range
        raise CorruptFileError(f"{path}: item {key!r} cannot be read ({str(exc).splitlines()[0][:120]})",
                               hint="re-save the checkpoint") from None


def read_subtree(directory: Path | str, head: str) -> dict[tuple, Any]:
    """Every item under the top-level key ``head``: {key path without ``head``: value}, tensors through
    ``dcp.load`` (weights-only), other values through weights-only loads of their byte ranges."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    meta = read_dcp_metadata(directory)
    planner = meta.planner_data if isinstance(meta.planner_data, dict) else {}
    tensors: dict[str, torch.Tensor] = {}
    out: dict[tuple, Any] = {}
    for key, md in meta.state_dict_metadata.items():
        kp = tuple(planner.get(key, (key,)))
        if len(kp) < 2 or kp[0] != head:
            continue
        if isinstance(md, TensorStorageMetadata):
            tensors[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        else:
            out[kp[1:]] = _read_bytes_item(directory, meta, key)
    if tensors:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.load(tensors, storage_reader=_safe_reader(directory, meta), no_dist=True)
            except Exception as exc:  # noqa: BLE001 - torch wraps reader failures in CheckpointException
                raise CorruptFileError(f"{directory}: cannot read the {head} state ({str(exc).splitlines()[0]})",
                                       hint="re-save the checkpoint") from None
        for key, value in tensors.items():
            out[tuple(planner.get(key, (key,)))[1:]] = value
    return out


def optimizer_state_dict(directory: Path | str) -> dict:
    """The ``optimizer`` subtree as a torch optimizer state dict keyed by index, with ``param_names`` in every
    group (so names map exactly). Reads both layouts ``get_state_dict`` / ``get_optimizer_state_dict`` write:
    nested (state/<name>/<key>, param_groups/<i>/<hp> with 'params' = names) and flattened
    (``flatten_optimizer_state_dict=True``, as torchtitan saves: 'state.<name>.<key>', 'param_groups.<name>.<hp>',
    groups rebuilt from the parameters that share hyper-parameters)."""
    from ckptaudit.errors import OptimizerStateError

    items = read_subtree(directory, "optimizer")
    if not items:
        raise OptimizerStateError(f"{directory}: the DCP checkpoint has no optimizer state")
    state: dict[str, dict] = {}
    groups: dict[Any, dict] = {}
    flat_groups: dict[str, dict] = {}
    for kp, value in items.items():
        if len(kp) == 3 and kp[0] == "state":
            state.setdefault(str(kp[1]), {})[str(kp[2])] = value
        elif len(kp) == 3 and kp[0] == "param_groups":
            groups.setdefault(kp[1], {})[str(kp[2])] = value
        elif len(kp) == 1 and str(kp[0]).startswith("state."):
            name, _, leaf = str(kp[0])[len("state."):].rpartition(".")
            state.setdefault(name, {})[leaf] = value
        elif len(kp) == 1 and str(kp[0]).startswith("param_groups."):
            name, _, leaf = str(kp[0])[len("param_groups."):].rpartition(".")
            flat_groups.setdefault(name, {})[leaf] = value
    if flat_groups:  # one group per distinct set of hyper-parameters, in the order parameters appear
        for name, hyper in flat_groups.items():
            sig = repr(sorted(hyper.items()))
            groups.setdefault(sig, {**hyper, "params": []})["params"].append(name)
    named_groups = [groups[k] for k in (sorted(groups) if not flat_groups else groups)]
    raw_groups, raw_state, index = [], {}, 0
    for g in named_groups:
        names = [str(n) for n in g.get("params", [])]
        ids = list(range(index, index + len(names)))
        index += len(names)
        raw_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids, "param_names": names})
        for i, name in zip(ids, names, strict=True):
            if name in state:
                raw_state[i] = state[name]
    stray = set(state) - {n for g in raw_groups for n in g["param_names"]}
    if stray:
        raise OptimizerStateError(f"{directory}: optimizer state for parameters in no param group: {sorted(stray)[:5]}")
    return {"state": raw_state, "param_groups": raw_groups}


def scheduler_state_dict(directory: Path | str) -> dict | None:
    """The ``lr_scheduler`` subtree as the scheduler's state dict, or None when the checkpoint has none."""
    items = read_subtree(directory, "lr_scheduler")
    if not items:
        return None
    out: dict = {}
    for kp, value in items.items():
        cur = out
        for part in kp[:-1]:
            cur = cur.setdefault(str(part), {})
        cur[str(kp[-1])] = value
    if isinstance(out.get("base_lrs"), list) and "lr_lambdas" not in out:
        # LambdaLR keeps one (usually empty) dict per lambda; DCP writes no item for an empty dict
        out["lr_lambdas"] = [None] * len(out["base_lrs"])
    return out


def open_checkpoint_tensors(ckpt: Any) -> DCPSource:
    """The model tensors of a DCP checkpoint; names the model of its config ties are listed once."""
    from ckptaudit.errors import CkptAuditError
    from ckptaudit.io.models import tied_groups

    try:
        config = ckpt.config()
        tied = tied_groups(config) if config else ()
    except CkptAuditError:
        tied = ()
    return DCPSource(Path(ckpt.weights_entry or ckpt.path), tied=tied)


open_tensors = open_checkpoint_tensors  # the stack-reader entry point (io.discover.stack_reader)
