"""HDF5 reports: one file per command run, written atomically (temp file, then rename).

Layout (schema_version 1)::

    /                 attrs: schema_version, ckptaudit_version, command, argv (JSON), created (UTC ISO 8601),
                             device, torch_version, notes (JSON list of the warnings the libraries gave)
    /inputs           datasets: step (int64), path (str), bytes (int64), sha256 (str; "" with --no-hash)
    /<command>/...    the result tree of the command

A result tree is a nested dict: dict -> group; numpy array or list of numbers -> dataset; list of str -> string
dataset; list of dicts -> group with subgroups "0", "1", ...; scalar (int, float, bool, str) -> attribute;
None -> listed in the group's ``none_attrs`` attribute (HDF5 has no null).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ckptaudit import __version__

SCHEMA_VERSION = 1
SUMMARY_DATASET = "summary_json"  # the command's --json document, as text


@dataclass(frozen=True)
class InputRecord:
    """One checkpoint that went into a report."""

    step: int
    path: str
    bytes: int
    sha256: str


def sha256_files(paths: Iterable[Path], chunk: int = 1 << 22) -> str:
    """SHA-256 over the bytes of ``paths`` in the given order (one digest for a sharded checkpoint)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                h.update(b)
    return h.hexdigest()


def input_records(checkpoints: Sequence[Any], hash_files: bool = True) -> list[InputRecord]:
    """Records for checkpoints exposing ``step``, ``path`` and ``weight_files``."""
    out = []
    for c in checkpoints:
        files = list(c.weight_files)
        out.append(
            InputRecord(
                step=int(c.step),
                path=str(c.path),
                bytes=int(sum(Path(f).stat().st_size for f in files)),
                sha256=sha256_files(files) if hash_files else "",
            )
        )
    return out


def write_report(
    path: Path,
    command: str,
    argv: Sequence[str],
    tree: dict,
    inputs: Sequence[InputRecord] = (),
    device: str = "cpu",
    group: str | None = None,
    notes: Sequence[str] = (),
    summary: dict | None = None,
) -> Path:
    """Write a complete report to ``path`` atomically; nothing is left behind on failure.

    ``group`` is the top-level group holding ``tree`` (default: the command name with '-' -> '_'); ``notes`` the
    warnings the libraries gave while the command ran (root attribute ``notes``, a JSON list); ``summary`` the
    command's ``--json`` document, kept as the text dataset ``/summary_json`` so that ``report show`` can render
    the command's own view again.
    """
    import torch  # local: keep `ckptaudit --help` fast

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["ckptaudit_version"] = __version__
            f.attrs["command"] = h5_text(command)
            f.attrs["argv"] = json.dumps(list(argv))
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["device"] = str(device)
            f.attrs["torch_version"] = str(torch.__version__)
            f.attrs["notes"] = json.dumps([h5_text(n) for n in notes])
            g = f.create_group("inputs")
            str_dt = h5py.string_dtype()
            g.create_dataset("step", data=np.array([r.step for r in inputs], dtype=np.int64))
            g.create_dataset("path", data=np.array([h5_text(r.path) for r in inputs], dtype=object), dtype=str_dt)
            g.create_dataset("bytes", data=np.array([r.bytes for r in inputs], dtype=np.int64))
            g.create_dataset("sha256", data=np.array([r.sha256 for r in inputs], dtype=object), dtype=str_dt)
            if summary is not None:
                from ckptaudit.report.tree import to_jsonable

                f.create_dataset(SUMMARY_DATASET, data=h5_text(json.dumps(to_jsonable(summary))),
                                 dtype=h5py.string_dtype())
            top = f.create_group(group or command.replace("-", "_").replace(" ", "_"))
            write_tree(top, tree)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def h5_text(s: object) -> str:
    """``s`` as text HDF5 can store: its strings cannot hold NUL and must be valid UTF-8, so a NUL becomes the
    four characters ``\\x00`` and a lone surrogate (an undecodable file name) its backslash escape."""
    text = str(s)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def write_tree(g: h5py.Group, tree: dict) -> None:
    """Write a nested result tree into group ``g`` (see the module docstring for the mapping)."""
    nones = []
    for key, val in tree.items():
        key = h5_text(key)
        if isinstance(val, dict):
            write_tree(g.create_group(key), val)
        elif val is None:
            nones.append(key)
        elif isinstance(val, str):
            g.attrs[key] = h5_text(val)  # plain str: h5py has no conversion for str subclasses such as TorchVersion
        elif isinstance(val, (bool, int, float, np.integer, np.floating, np.bool_)):
            g.attrs[key] = val
        elif isinstance(val, (list, tuple)) and val and all(isinstance(v, dict) for v in val):
            sub = g.create_group(key)
            sub.attrs["is_list"] = True
            for i, v in enumerate(val):
                write_tree(sub.create_group(str(i)), v)
        elif isinstance(val, (list, tuple)) and val and all(isinstance(v, str) for v in val):
            g.create_dataset(key, data=np.array([h5_text(v) for v in val], dtype=object), dtype=h5py.string_dtype())
        else:
            arr = np.asarray(val.detach().cpu().numpy() if hasattr(val, "detach") else val)
            if arr.dtype == object:
                arr = np.array([np.nan if v is None else v for v in arr.ravel()], dtype=np.float64).reshape(arr.shape)
            g.create_dataset(key, data=arr)
    if nones:
        g.attrs["none_attrs"] = json.dumps(nones)


def read_report(path: Path) -> dict:
    """Read a report back into a nested dict (attributes under ``@attrs``, datasets as numpy arrays)."""
    from ckptaudit.errors import CorruptFileError, InputNotFoundError

    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such report", "pass the .h5 file a ckptaudit command wrote")
    try:
        with h5py.File(path, "r") as f:
            if "schema_version" not in f.attrs:
                raise CorruptFileError(f"{path}: not a ckptaudit report (no schema_version)", "pass a file written by ckptaudit --out")
            return _read_group(f, depth=0)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFileError(f"{path}: not a readable HDF5 file ({first})", "pass a file written by ckptaudit --out") from None


# A report is untrusted input too: its text is decoded leniently (invalid UTF-8 becomes U+FFFD), a link that
# leads nowhere is read as a note of where it pointed, and groups nest at most this deep.
_MAX_GROUP_DEPTH = 64


def _read_group(g: h5py.Group, depth: int) -> dict:
    if depth > _MAX_GROUP_DEPTH:
        raise ValueError(f"groups nested more than {_MAX_GROUP_DEPTH} deep")
    out: dict[str, Any] = {"@attrs": {}}
    for k in g.attrs.keys():
        try:
            out["@attrs"][k] = _attr(g.attrs[k])
        except (OSError, UnicodeDecodeError, TypeError, ValueError) as e:
            out["@attrs"][k] = f"<unreadable attribute: {type(e).__name__}>"
    for k in g.keys():
        link = g.get(k, getlink=True)
        try:
            v = g[k]
        except (KeyError, OSError, ValueError):
            target = getattr(link, "path", None)
            where = f" to {getattr(link, 'filename', '')}:{target}" if isinstance(link, h5py.ExternalLink) else (
                f" to {target}" if target else "")
            out[k] = f"<dangling link{where}>"
            continue
        if isinstance(v, h5py.Group):
            if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                out[k] = f"<link to {getattr(link, 'path', '?')}>"  # not followed: a link may loop back to a parent
                continue
            out[k] = _read_group(v, depth + 1)
        elif isinstance(v, h5py.Dataset):
            data = v[()]
            if v.dtype.kind in "OS" or h5py.check_string_dtype(v.dtype) is not None:
                data = np.array([_text(x) for x in np.atleast_1d(data)], dtype=object)
            out[k] = data
        else:
            out[k] = f"<{type(v).__name__}>"
    return out


def _text(x: Any) -> Any:
    return x.decode("utf-8", errors="replace") if isinstance(x, (bytes, np.bytes_)) else x


def _attr(v: Any) -> Any:
    if isinstance(v, (bytes, np.bytes_)):
        return _text(v)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.dtype.kind in "OS":
        return np.array([_text(x) for x in v.ravel()], dtype=object).reshape(v.shape)
    return v
