"""The storage format of a weight file, from its first bytes (never its extension)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from ckptaudit.errors import InputNotFoundError, LayoutError

# A JSON index larger than this is not an index (safetensors caps its own header at 100 MB as well).
_MAX_INDEX_BYTES = 100 * 1024 * 1024


# ------------------------------------------------------------------------------------------ format detection


def detect_format(path: Path | str) -> str:
    """The storage format of ``path``, from its first bytes (never its extension).

    Returns one of FORMATS: "safetensors" (8-byte little-endian header length, then '{'), "safetensors-index"
    (a JSON file with a "weight_map", e.g. model.safetensors.index.json), "torch-zip" (a torch.save zip archive),
    "torch-legacy" (a pickle: first byte 0x80), "gguf" (b"GGUF"), "dcp" (a directory holding ".metadata").
    Raises InputNotFoundError for a missing path and LayoutError for anything else.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory", hint="check the path")
    if p.is_dir():
        if (p / ".metadata").is_file():
            return "dcp"
        raise LayoutError(
            f"{p}: a directory without a torch.distributed.checkpoint '.metadata' file",
            hint="pass a weight file, or open the directory with open_tensors / discover_run",
        )
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04":
        if _is_torch_zip(p):
            return "torch-zip"
        raise LayoutError(f"{p}: a zip archive that torch.save did not write (no data.pkl inside)")
    # safetensors before pickles: a header length whose low byte is 0x80 also starts with the pickle opcode PROTO.
    # The header is JSON and may start with JSON whitespace (the library accepts it); its length must fit the file.
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if n > 0 and (head[8:9] == b"{" or (head[8:9] in (b" ", b"\t", b"\n", b"\r") and n <= p.stat().st_size - 8)):
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if head.lstrip()[:1] == b"{" and p.stat().st_size <= _MAX_INDEX_BYTES:
        from ckptaudit.errors import CkptAuditError
        from ckptaudit.io.jsonio import read_json

        try:
            index = read_json(p, max_bytes=_MAX_INDEX_BYTES)
        except CkptAuditError:
            index = None
        if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
            return "safetensors-index"
    raise LayoutError(
        f"{p}: not a checkpoint file ckptaudit can read (first bytes {head[:9]!r})",
        hint="expected safetensors, a sharded *.index.json, torch.save output, GGUF or a DCP folder",
    )


def _is_torch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        # A truncated torch zip has no readable central directory; torch.load will report it as corrupt.
        return True
