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
from ckptaudit.io.tensors import STATE_DICT_KEYS, TensorSource

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


class DCPSource(TensorSource):
    """The model tensors of a DCP folder.

    Which tensors are the model's: the original key path of each item is in ``Metadata.planner_data``. When the
    checkpoint nests a state dict under one of STATE_DICT_KEYS (``{"model": model.state_dict(), "optimizer":
    ...}``, as Accelerate and FSDP write), only that subtree is exposed, with the prefix removed ("model.a.weight"
    -> "a.weight"). Otherwise every tensor is exposed under its flattened name.
    """

    def __init__(self, directory: Path):
        super().__init__(directory, "dcp")
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
                self._names[key] = key
            elif len(kp) > 1 and kp[0] == prefix:
                self._names[".".join(map(str, kp[1:]))] = key
        self._items = items

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
