"""``torch.load`` restricted to weights-only unpickling: the one way a torch.save file is opened."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError, LayoutError, UnsafePickleError
from ckptaudit.io.detect import detect_format
from ckptaudit.io.source import _RESAVE_HINT

# ------------------------------------------------------------------------------------------ safe torch.load

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def safe_torch_load(path: Path | str, extra_globals: Sequence[Any] = ()) -> Any:
    """``torch.load`` restricted to weights-only unpickling, onto the CPU.

    Zip archives are memory-mapped (tensor bytes are read when touched). ``extra_globals`` are classes or
    functions allowed in addition to torch's weights-only list (e.g. numpy's reconstruct for RNG states); pass
    as few as possible. A pickle that needs any other global raises UnsafePickleError naming the file and the
    global: the unpickler refuses before calling it, so the file's code never runs. A damaged archive raises
    CorruptFileError; a missing file InputNotFoundError.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt not in ("torch-zip", "torch-legacy"):
        raise LayoutError(f"{p}: a {fmt} file, not a torch.save file", hint="open it with open_tensors")
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=fmt == "torch-zip")
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise CorruptFileError(f"{p}: cannot be unpickled ({text.splitlines()[0]})", hint=_RESAVE_HINT) from None
        offenders = _unsafe_globals(p, fmt, text, extra_globals)
        if offenders:
            what = f"the global{'s' if len(offenders) > 1 else ''} {', '.join(offenders)}"
        else:
            reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if "WeightsUnpickler" in text else ""
            what = f"pickle features outside the weights-only subset ({reason or 'see torch.load'})"
        raise UnsafePickleError(
            f"{p}: refused to unpickle: it needs {what}, which weights-only loading does not allow; "
            "none of its code was run",
            hint="re-save it as a plain state dict of tensors (or safetensors) from a trusted environment",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(f"{p}: torch.load cannot read it ({first})", hint=_RESAVE_HINT) from None


def _unsafe_globals(path: Path, fmt: str, message: str, extra_globals: Sequence[Any]) -> list[str]:
    """Names of the globals a pickle needs beyond the allow-list, found without running it."""
    found: list[str] = []
    if fmt == "torch-zip":
        try:
            found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - best effort: the error message below still names one
            found = []
    allowed = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', getattr(g, '__name__', ''))}" for g in extra_globals}
    found = [g for g in found if g not in allowed]
    m = _GLOBAL_RE.search(message)
    if m and m.group(1) not in found:
        found.insert(0, m.group(1))
    return found
