"""The precision a model runs in: the checkpoint's dtype on a GPU, float32 on the CPU, or what ``--dtype`` says.

:func:`resolve_dtype` returns the torch dtype and a :class:`Precision` record for the report: the dtype used,
the checkpoint's own dtype (config.json ``torch_dtype`` / ``dtype``, else the stored dtype of its floating-point
weights; a GGUF file is dequantised and counts as float32) and why this one was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ckptaudit.errors import UsageError

__all__ = ["DTYPES", "Precision", "checkpoint_dtype", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Precision:
    """The dtype a command ran its model in (``dtype``), the checkpoint's own (``checkpoint``, None when unknown)
    and the reason (``source``: "--dtype", "checkpoint dtype on GPU", "float32 on CPU")."""

    dtype: str
    checkpoint: str | None
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "checkpoint_dtype": self.checkpoint, "source": self.source}

    def note(self) -> str | None:
        """A sentence for the report when the model does not run in the checkpoint's own dtype, else None."""
        if self.checkpoint is None or self.checkpoint == self.dtype:
            return None
        return f"the checkpoint stores {self.checkpoint}; the model ran in {self.dtype} ({self.source})"


def checkpoint_dtype(ckpt: Any) -> torch.dtype | None:
    """The checkpoint's own floating-point dtype: config.json's ``torch_dtype`` / ``dtype``, else the dtype most of
    its floating-point weights are stored in (by element count); None when it cannot be told."""
    if getattr(ckpt, "layout", None) == "gguf":
        return torch.float32
    config = ckpt.config() if hasattr(ckpt, "config") else None
    for key in ("torch_dtype", "dtype"):
        value = (config or {}).get(key)
        if isinstance(value, str) and value in DTYPES:
            return DTYPES[value]
    counts: dict[torch.dtype, int] = {}
    try:
        with ckpt.tensors() as src:
            for name in src.keys():
                dt = src.dtype(name)
                if dt.is_floating_point:
                    n = 1
                    for s in src.shape(name):
                        n *= int(s)
                    counts[dt] = counts.get(dt, 0) + n
    except Exception:  # noqa: BLE001 - the dtype is a report detail; the load that follows reports bad files
        return None
    return max(counts, key=counts.get) if counts else None


def resolve_dtype(spec: str | None, ckpt: Any, device: str) -> tuple[torch.dtype, Precision]:
    """(dtype, record) for ``--dtype spec`` ("auto" or None, float32, bfloat16, float16) on ``device``."""
    own = checkpoint_dtype(ckpt) if ckpt is not None else None
    key = (spec or "auto").strip().lower()
    if key != "auto":
        if key not in DTYPES:
            raise UsageError(f"--dtype {spec}: unknown dtype", "use auto, float32, bfloat16 or float16")
        dtype, source = DTYPES[key], "--dtype"
    elif str(device).startswith("cuda") and own is not None:
        dtype, source = own, "checkpoint dtype on GPU"
    else:
        dtype, source = torch.float32, "float32 on CPU" if not str(device).startswith("cuda") else "float32 (dtype unknown)"
    return dtype, Precision(_name(dtype), _name(own), source)
