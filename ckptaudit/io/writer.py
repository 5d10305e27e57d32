"""Write a safetensors file tensor by tensor (for singular vectors that must never be held whole in memory)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor, in a fixed order declared up front.

    ``specs`` maps name -> (shape, dtype); tensors must then be written with :meth:`write` in exactly that order.
    The header is written first (its offsets follow from the shapes), so at most one tensor is in memory.
    """

    def __init__(self, path: Path | str, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._order = list(specs)
        self._specs = dict(specs)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        for name in self._order:
            shape, dtype = self._specs[name]
            n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append tensor ``name`` (must be the next in the declared order, with the declared shape)."""
        expect = self._order[self._next]
        shape, dtype = self._specs[expect]
        if name != expect or tuple(t.shape) != tuple(shape):
            raise ValueError(f"expected {expect} {shape}, got {name} {tuple(t.shape)}")
        data = t.detach().to("cpu", dtype).contiguous()
        self._f.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> Path:
        """Finish the file (all declared tensors must have been written); returns its path."""
        self._f.close()
        if self._next != len(self._order):
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        self._tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)
