"""The one interface every checkpoint format is read through: :class:`TensorSource` (lazy tensors by name),
with the generic ranged read the formats without positioned reads share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ckptaudit.errors import LayoutError

FORMATS = ("safetensors", "safetensors-index", "torch-zip", "torch-legacy", "gguf", "dcp")

# Keys under which training frameworks nest the model's state dict, most specific first
# (Lightning: "state_dict"; many scripts: "model_state_dict" / "model"; DeepSpeed and DDP wrappers: "module").
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")

_RESAVE_HINT = "the file is damaged or incomplete: re-save or re-download it"


class TensorNotFoundError(LayoutError, KeyError):
    """A tensor name that the checkpoint does not hold (also a KeyError, like a missing dict key)."""

    __str__ = Exception.__str__


# ------------------------------------------------------------------------------------------ TensorSource


class TensorSource:
    """The tensors of one checkpoint, read lazily. Use as a context manager (``with open_tensors(p) as src``).

    ``path`` is what was opened, ``format`` its storage format (one of FORMATS). Tensors come back on the CPU in
    their stored dtype (bf16 stays bf16), except quantised GGUF tensors, which are dequantised to float32.
    Do not modify returned tensors in place: pickled checkpoints hand out their own (memory-mapped) storage.
    """

    def __init__(self, path: Path, fmt: str):
        self.path = Path(path)
        self.format = fmt

    def keys(self) -> list[str]:
        """Every tensor name, in a stable order (the file's order)."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (from headers; no tensor data is read)."""
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        """The dtype ``get(name)`` returns: the stored dtype (float32 for dequantised GGUF tensors)."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU; reads only its bytes."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The weight files behind this source (every shard of a sharded checkpoint)."""
        raise NotImplementedError

    #: True when ``read_flat`` reads only the requested bytes; False when it fetches the whole tensor once
    #: (and keeps that one tensor until another name is asked for).
    ranged_reads = False

    def numel(self, name: str) -> int:
        """Number of scalars of tensor ``name`` (from headers)."""
        n = 1
        for s in self.shape(name):
            n *= int(s)
        return n

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of tensor ``name`` flattened in row-major order: a 1-D CPU tensor in the
        dtype ``get(name)`` returns.

        ``out``: an optional contiguous 1-D tensor of that dtype with at least ``stop - start`` elements; the
        values are written to ``out[:stop - start]``, which is returned (no allocation). This generic version
        fetches the whole tensor with ``get`` the first time a name is asked for and slices it; the tensor is
        kept until another name is read or the source is closed (``ranged_reads`` is False).
        """
        total = self.numel(name)
        _check_range(self, name, start, stop, total)
        cached = getattr(self, "_flat_cache", None)
        if cached is None or cached[0] != name:
            self._flat_cache = None
            self._flat_cache = (name, self.get(name).reshape(-1))
            cached = self._flat_cache
        part = cached[1][start:stop]
        if out is None:
            return part.clone()
        target = _out_view(self, name, out, part.dtype, stop - start)
        target.copy_(part)
        return target

    def nbytes(self, name: str) -> int:
        """Size in bytes of the tensor ``get(name)`` returns (numel x element size)."""
        n = 1
        for s in self.shape(name):
            n *= int(s)
        return n * _itemsize(self.dtype(name))

    def close(self) -> None:
        """Release open files and memory maps. Idempotent."""
        self._flat_cache = None

    def __contains__(self, name: object) -> bool:
        return name in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, format={self.format!r})"

    def _missing(self, name: str) -> TensorNotFoundError:
        keys = self.keys()
        near = [k for k in keys if name.split(".")[-1] in k][:5]
        return TensorNotFoundError(
            f"{self.path}: no tensor named {name!r} ({len(keys)} tensors"
            + (f"; similar: {', '.join(near)}" if near else "")
            + ")"
        )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_range(src: TensorSource, name: str, start: int, stop: int, total: int) -> None:
    if not 0 <= int(start) <= int(stop) <= total:
        raise ValueError(f"{src.path}: range [{start}, {stop}) is outside tensor {name!r} of {total} elements")


def _out_view(src: TensorSource, name: str, out: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    if out.dtype != dtype or out.dim() != 1 or not out.is_contiguous() or out.numel() < n or out.device.type != "cpu":
        raise ValueError(f"{src.path}: read_flat of {name!r} needs a contiguous 1-D CPU {dtype} buffer of >= {n} "
                         f"elements, got {out.dtype} {tuple(out.shape)}")
    return out[:n]
