"""TensorSources for pickled state dicts (weights-only torch.load) and GGUF files.

Imported lazily by ``ckptaudit.io.tensors.open_tensors`` (like ``io/dcp.py``), so reading safetensors never pulls
in the gguf package.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.errors import CorruptFileError, LayoutError
from ckptaudit.io.source import _RESAVE_HINT, STATE_DICT_KEYS, TensorSource
from ckptaudit.io.torchload import safe_torch_load


class PickleSource(TensorSource):
    """A ``torch.save`` file loaded weights-only (memory-mapped for zip archives); non-tensor entries ignored."""

    def __init__(self, path: Path, fmt: str):
        super().__init__(path, fmt)
        obj = safe_torch_load(self.path)
        tensors = find_state_dict(obj, self.path)
        self._aliases = shared_storage_aliases(tensors)
        # A tensor stored under two names (a tied head in a .bin / Lightning / DeepSpeed / nanoGPT file) is one
        # tensor: it is exposed once, under its first name, like the safetensors copy of the same model.
        self._tensors: dict[str, torch.Tensor] | None = {k: v for k, v in tensors.items() if k not in self._aliases}

    def _t(self, name: str) -> torch.Tensor:
        assert self._tensors is not None, "source is closed"
        try:
            return self._tensors[name]
        except KeyError:
            raise self._missing(name) from None

    def keys(self) -> list[str]:
        return list(self._tensors or ())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._t(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._t(name)

    def aliases(self) -> dict[str, str]:
        """Names left out of ``keys()`` because they share storage with an earlier name: {left out: kept}."""
        return dict(self._aliases)

    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self._tensors = None
        self._flat_cache = None


def shared_storage_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{name: earlier name} for every tensor that is the same view of the same storage as an earlier one (same
    storage, offset, shape, strides and dtype): torch.save keeps tied parameters as one storage."""
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in tensors.items():
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        except (RuntimeError, NotImplementedError):
            continue
        if key[0] == 0 or t.numel() == 0:  # empty storages all share address 0
            continue
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the state dict inside a loaded pickle: ``obj`` itself, or nested under STATE_DICT_KEYS.

    A nested dict is taken only when it holds tensors (checked recursively, so {"model": {"state_dict": ...}}
    works). Non-tensor entries are dropped. Raises LayoutError when no tensors are found.
    """
    seen: list[str] = []
    cur: Any = obj
    for _ in range(4):  # bounded: nesting deeper than this is not a state-dict layout we know
        if not isinstance(cur, Mapping):
            break
        nested = next(
            (k for k in STATE_DICT_KEYS if isinstance(cur.get(k), Mapping) and _holds_tensors(cur[k])), None
        )
        if nested is None:
            break
        seen.append(nested)
        cur = cur[nested]
    if isinstance(cur, Mapping):
        # nn.Parameter entries (some stacks pickle parameters, not their data) are handed out as plain tensors
        tensors = {str(k): v.detach() if v.requires_grad else v for k, v in cur.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    top = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise LayoutError(
        f"{path}: no state dict of tensors found (top level: {top})",
        hint=f"ckptaudit looks for tensors at the top level or under {', '.join(STATE_DICT_KEYS)}",
    )


def _holds_tensors(d: Mapping, depth: int = 3) -> bool:
    for v in d.values():
        if isinstance(v, torch.Tensor):
            return True
        if depth > 0 and isinstance(v, Mapping) and _holds_tensors(v, depth - 1):
            return True
    return False


# GGUF metadata keys ({architecture}.<key>) -> the config.json names the architecture files read.
_GGUF_DIMS = {"attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
              "embedding_length": "hidden_size", "block_count": "num_hidden_layers",
              "attention.key_length": "head_dim"}


def gguf_dims(path: Path) -> dict[str, int]:
    """The model dimensions a GGUF file records in its metadata (head counts, hidden size, layers), under the
    config.json names, for per-head slicing. No ``model_type``: the tensors carry llama.cpp's names, which the
    llama_cpp architecture file places whatever the model. Empty when the file records none."""
    import gguf

    try:
        fields = gguf.GGUFReader(str(path), "r").fields
        arch = fields.get("general.architecture")
        prefix = str(arch.contents()) if arch is not None else None
    except Exception as exc:  # noqa: BLE001 - an untrusted file: any failure means it is damaged
        raise CorruptFileError(f"{path}: not a readable GGUF file ({exc})", hint=_RESAVE_HINT) from None
    out: dict[str, int] = {}
    for key, name in _GGUF_DIMS.items():
        field = fields.get(f"{prefix}.{key}") if prefix else None
        try:
            value = field.contents() if field is not None else None
        except Exception:  # noqa: BLE001 - a malformed field is simply not used
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31:
            out[name] = value
    return out


class GGUFSource(TensorSource):
    """A GGUF file via ``gguf.GGUFReader`` (memory-mapped). GGUF stores dimensions innermost-first; shapes here
    are in torch order. F32/F16/BF16/F64 and integer tensors keep their dtype; quantised ones become float32."""

    _NATIVE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
               "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}

    def __init__(self, path: Path):
        super().__init__(path, "gguf")
        import gguf

        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
            self._by_name = {t.name: t for t in self._reader.tensors}
        except Exception as exc:  # noqa: BLE001 - gguf parses an untrusted file: any failure means it is damaged
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CorruptFileError(f"{self.path}: not a readable GGUF file ({first})", hint=_RESAVE_HINT) from None

    def _t(self, name: str) -> Any:
        try:
            return self._by_name[name]
        except KeyError:
            raise self._missing(name) from None

    def keys(self) -> list[str]:
        return list(self._by_name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in reversed(self._t(name).shape))

    def dtype(self, name: str) -> torch.dtype:
        return self._NATIVE.get(self._t(name).tensor_type.name, torch.float32)

    def get(self, name: str) -> torch.Tensor:
        import gguf

        t = self._t(name)
        shape = self.shape(name)
        kind = t.tensor_type.name
        if kind == "BF16":  # numpy has no bfloat16: reinterpret the raw bytes as int16, then as bf16
            raw = np.ascontiguousarray(t.data).view(np.int16)
            return torch.from_numpy(raw.copy()).view(torch.bfloat16).reshape(shape)
        if kind in self._NATIVE:
            return torch.from_numpy(np.array(t.data)).reshape(shape)
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)

    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self._by_name = {}
        self._reader = None
        self._flat_cache = None
