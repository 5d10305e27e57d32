"""File safety of torch.distributed.checkpoint folders: ``.metadata`` and the ``*.distcp`` data files.

``.metadata`` is a pickle: scanned statically, it must name only the metadata classes that ``io/dcp.py``'s
restricted unpickler builds (an allow-list that is safe, see ``io/safety.py``). A ``.distcp`` file is the
concatenation of the items the metadata lists (``storage_data``: file, offset, length): each tensor item is a
``torch.save`` archive of one tensor (or, in the raw format, its bytes), each non-tensor item a ``torch.save``
archive of an arbitrary object, which ``torch.distributed.checkpoint.load`` unpickles with ``weights_only=False``.
Every item is scanned where it lies; the items must lie inside the file without overlapping. A ``.distcp`` whose
folder has no readable ``.metadata`` cannot be checked: unreadable.
"""

from __future__ import annotations

from pathlib import Path

from ckptaudit.io.safety import (
    DATA,
    UNREADABLE,
    WEIGHTS_ONLY,
    FileSafety,
    _Result,
    _scan_bytes,
    _scan_zip,
    _Window,
)


def dcp_file_safety(p: Path) -> FileSafety:
    """The FileSafety of ``.metadata`` or a ``*.distcp`` file of a DCP folder."""
    if p.name == ".metadata":
        out = _Result()
        _scan_bytes(p.read_bytes(), p.name, out)
        return _finish(p, "dcp-metadata", out)
    return _finish(p, "dcp-data", _scan_distcp(p))


def _finish(p: Path, kind: str, out: _Result) -> FileSafety:
    if out.verdict == DATA:
        detail = "tensor data of a torch.distributed.checkpoint folder"
    elif out.verdict == WEIGHTS_ONLY:
        detail = "weights-only loadable"
    else:
        detail = "; ".join(out.details[:3]) or out.verdict
    return FileSafety(str(p), kind, out.verdict, tuple(out.globals), detail, tuple(out.lists))


def _scan_distcp(p: Path) -> _Result:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from ckptaudit.errors import CkptAuditError
    from ckptaudit.io.dcp import read_dcp_metadata

    out = _Result()
    try:
        meta = read_dcp_metadata(p.parent)
    except CkptAuditError as exc:
        out.merge(UNREADABLE, (), f"its folder's .metadata cannot be read, so its items cannot be checked ({exc.message})")
        return out
    size = p.stat().st_size
    items = []
    for index, info in (getattr(meta, "storage_data", None) or {}).items():
        if str(getattr(info, "relative_path", "")) != p.name:
            continue
        offset, length = int(getattr(info, "offset", -1)), int(getattr(info, "length", -1))
        md = meta.state_dict_metadata.get(getattr(index, "fqn", None))
        items.append((offset, length, getattr(index, "fqn", "?"), isinstance(md, BytesStorageMetadata),
                      getattr(info, "transform_descriptors", None)))
    if not items:
        out.merge(UNREADABLE, (), "the folder's .metadata lists no item in this file")
        return out
    end = 0
    with open(p, "rb") as f:
        for offset, length, fqn, is_bytes, transforms in sorted(items):
            where = f"{p.name}[{fqn}]"
            if offset < end or length < 0 or offset + length > size:
                out.merge(UNREADABLE, (), f"{where}: bytes [{offset}, {offset + length}) overlap another item or lie "
                          f"outside the {size}-byte file")
                continue
            end = offset + length
            if transforms:
                out.merge(UNREADABLE, (), f"{where}: stored through transforms {transforms}; it cannot be checked")
                continue
            f.seek(offset)
            head = f.read(4)
            if head == b"PK\x03\x04":
                _scan_zip(_Window(f, offset, length), where, out)
            elif is_bytes or head[:1] == b"\x80":
                f.seek(offset)
                _scan_bytes(f.read(length), where, out)
            # else: raw tensor bytes (the non-torch.save serialization format)
    return out
