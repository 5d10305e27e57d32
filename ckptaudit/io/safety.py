"""File safety: what each file of a checkpoint is, judged by its content, and whether loading it can run code.

Nothing here executes a pickle. Pickles of every protocol are read by the static opcode scanner
(``io/pickle_scan.py``), inside zip archives (torch.save, nested archives) as well as bare, and each file gets one
verdict:

- ``data``: not a pickle at all, and well-formed: safetensors (header validated), GGUF, text/JSON, protobuf
  (sentencepiece models), numpy arrays without objects, DCP tensor data (``.distcp``) whose items are tensors;
- ``weights-only``: a pickle whose globals all lie in torch's weights-only allow-list: ``torch.load(...,
  weights_only=True)`` loads it as is;
- ``needs-allow-listed-globals``: a pickle that needs named globals beyond torch's, every one of them in one of the
  reviewed allow-lists below (the names are listed);
- ``unsafe``: a pickle that names globals outside every allow-list, an extension code, or a computed global (the
  names are listed); loading it could run anything;
- ``unreadable``: a file that is neither a known format nor loadable (empty, truncated, a damaged archive or header,
  binary content of no known kind, or a file named like a pickle that holds none). Never safe.

The one rule for allow-listed globals (``ALLOW_LISTS``): a file is *safe* when its verdict is ``data`` or
``weights-only``, or ``needs-allow-listed-globals`` with every list it draws on marked safe. numpy's array pieces
(what the Trainer allow-lists itself for rng_state.pth) and torch.distributed.checkpoint's metadata classes (what
``io/dcp.py``'s restricted unpickler builds) are safe: constructing them with the file's arguments does nothing
else. transformers' and accelerate's classes (``training_args.bin``: a pickled ``TrainingArguments``) are allow-listed
only for ckptaudit's own reader, ``io/plainpickle.py``, which gives it plain-data stand-ins and never imports or
calls them; ``torch.load`` would need ``weights_only=False`` (or those classes trusted), so such a file is not safe,
and the gate's ``safe_serialization`` check fails it unless the policy exempts it (the ``--init`` policy exempts
``training_args.bin`` with ``allow_files``).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.io.pickle_scan import PickleScan, PickleScanError, legacy_torch_magic, scan_pickles

DATA, WEIGHTS_ONLY, ALLOW_LISTED, UNSAFE, UNREADABLE = (
    "data", "weights-only", "needs-allow-listed-globals", "unsafe", "unreadable")
VERDICTS = (DATA, WEIGHTS_ONLY, ALLOW_LISTED, UNSAFE, UNREADABLE)
_RANK = {DATA: 0, WEIGHTS_ONLY: 1, ALLOW_LISTED: 2, UNREADABLE: 3, UNSAFE: 4}

MAX_SCAN_BYTES = 256 * 1024 * 1024  # a pickle (or archive member) larger than this is not scanned: unreadable
MAX_ZIP_MEMBERS = 1_000_000
MAX_ZIP_DEPTH = 3
MAX_TEXT_CHECK = 8 * 1024 * 1024
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")

# The files the default gate policy exempts from ``safe_serialization`` (its ``allow_files``), and what inspect
# says of them: one rule, in one place. The Trainer writes training_args.bin into every checkpoint; ckptaudit reads
# it only through io/plainpickle.py's stand-ins.
DEFAULT_EXEMPT_FILES = ("training_args.bin",)
EXEMPT_REASON = ("ckptaudit reads it only as plain data through stand-ins, never with torch.load; the default gate "
                 "policy exempts it (safe_serialization.allow_files)")


@dataclass(frozen=True)
class AllowList:
    """Globals a pickle may name beyond torch's weights-only defaults, who reads such files, and whether that is
    safe (see the module docstring). ``names``: exact "module.name"s; ``prefixes``: module prefixes."""

    name: str
    reader: str
    safe: bool
    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def covers(self, g: str) -> bool:
        return g in self.names or g.startswith(self.prefixes)


def _dcp_names() -> frozenset[str]:
    from ckptaudit.io.dcp import _ALLOWED

    return frozenset(f"{m}.{n}" for m, names in _ALLOWED.items() for n in names)


NUMPY_ARRAYS = AllowList(
    "numpy arrays", "torch.load(weights_only=True) under torch.serialization.safe_globals", True,
    names=frozenset({
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
        "numpy.dtypes.UInt32DType", "numpy.dtypes.Float64DType", "numpy.dtypes.Int64DType",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "_codecs.encode", "builtins.set",
        "collections.OrderedDict",
    }))
TRAINING_ARGUMENTS = AllowList(
    "transformers/accelerate objects", "ckptaudit/io/plainpickle.py (plain-data stand-ins; never torch.load)", False,
    prefixes=("transformers.", "accelerate."))


def allow_lists() -> tuple[AllowList, ...]:
    """Every reviewed allow-list, safe ones first (the DCP metadata list is built from io/dcp.py's own)."""
    dcp = AllowList("torch.distributed.checkpoint metadata", "ckptaudit/io/dcp.py (restricted unpickler)", True,
                    names=_dcp_names())
    return (NUMPY_ARRAYS, dcp, TRAINING_ARGUMENTS)


@dataclass(frozen=True)
class FileSafety:
    """One file of a checkpoint: its ``kind`` (safetensors, gguf, text, json, protobuf, numpy, pickle, torch-zip,
    zip, dcp-metadata, dcp-data, directory, unknown), its ``verdict`` (one of VERDICTS), the globals that decided a
    pickle verdict, and a one-line ``detail``."""

    path: str
    kind: str
    verdict: str
    globals: tuple[str, ...] = ()
    detail: str = ""
    lists: tuple[str, ...] = field(default=(), compare=False)  # names of the allow-lists drawn on

    @property
    def safe(self) -> bool:
        """True when loading the file cannot run code of the file's choosing (see the module docstring)."""
        if self.verdict in (DATA, WEIGHTS_ONLY):
            return True
        if self.verdict == ALLOW_LISTED:
            by_name = {a.name: a for a in allow_lists()}
            return all(by_name[n].safe for n in self.lists if n in by_name)
        return False

    @property
    def loadable(self) -> bool:
        """True when the file is well-formed (any verdict but unreadable)."""
        return self.verdict != UNREADABLE

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "safe": self.safe, "verdict": self.verdict,
                "globals": list(self.globals), "detail": self.detail}


def _torch_allowed() -> set[str]:
    from torch import _weights_only_unpickler as wou

    allowed = set(wou._get_allowed_globals())
    allowed.update(wou._get_user_allowed_globals())
    return allowed


def _resolved(g: str) -> str:
    """A global as the unpickler resolves it: Python 2 names of protocol-0..2 pickles mapped as pickle maps them
    (``__builtin__.set`` -> ``builtins.set``, ``copy_reg._reconstructor`` -> ``copyreg._reconstructor``)."""
    import _compat_pickle

    module, _, name = g.rpartition(".")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module),
                                                                    name))
    return f"{module}.{name}"


def pickle_verdict(scan: PickleScan) -> tuple[str, tuple[str, ...], str, tuple[str, ...]]:
    """(verdict, globals named, detail, allow-lists drawn on) of a scanned pickle, per the module's rule."""
    bad: list[str] = [f"extension code {c} (copyreg)" for c in scan.ext_codes]
    if scan.computed_globals:
        bad.append(f"{scan.computed_globals} STACK_GLOBAL(s) with computed names")
    extra = [g for g in map(_resolved, scan.globals) if g not in _torch_allowed()]
    lists: list[str] = []
    for g in extra:
        owner = next((a for a in allow_lists() if a.covers(g)), None)
        if owner is None:
            bad.append(g)
        elif owner.name not in lists:
            lists.append(owner.name)
    calls = f" (called through {', '.join(sorted(scan.calls))})" if scan.calls else ""
    if bad:
        return UNSAFE, tuple(bad), f"needs globals outside every allow-list: {', '.join(bad[:6])}{calls}", ()
    if not extra:
        return WEIGHTS_ONLY, (), "weights-only loadable", ()
    by_name = {a.name: a for a in allow_lists()}
    readers = "; ".join(f"{n}: read by {by_name[n].reader}" for n in lists)
    shown = ", ".join(extra[:6]) + (f" (+{len(extra) - 6} more)" if len(extra) > 6 else "")
    return ALLOW_LISTED, tuple(extra), f"needs the allow-listed globals {shown} ({readers})", tuple(lists)


# ------------------------------------------------------------------------------------------------ containers


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a seekable stream (a .distcp item, a nested archive)."""

    def __init__(self, f: Any, start: int, length: int):
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass
class _Result:
    verdict: str = DATA
    globals: list[str] = field(default_factory=list)
    lists: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def merge(self, verdict: str, globs: Iterable[str], detail: str, lists: Iterable[str] = ()) -> None:
        if _RANK[verdict] > _RANK[self.verdict]:
            self.verdict = verdict
        for g in globs:
            if g not in self.globals:
                self.globals.append(g)
        for n in lists:
            if n not in self.lists:
                self.lists.append(n)
        if detail and verdict != DATA:
            self.details.append(detail)


def _scan_bytes(data: bytes, where: str, out: _Result) -> None:
    try:
        scan = scan_pickles(data, count=5) if legacy_torch_magic(data) else scan_pickles(data)
    except PickleScanError as exc:
        out.merge(UNREADABLE, (), f"{where}: not a readable pickle ({exc})")
        return
    verdict, globs, detail, lists = pickle_verdict(scan)
    out.merge(verdict, globs, f"{where}: {detail}" if verdict != WEIGHTS_ONLY else "", lists)
    if verdict == WEIGHTS_ONLY and out.verdict == DATA:
        out.verdict = WEIGHTS_ONLY


def _scan_zip(stream: Any, where: str, out: _Result, depth: int = 0) -> str:
    """Scan every pickle of a zip archive (torch.save or not; nested archives too). Returns the kind."""
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        out.merge(UNREADABLE, (), f"{where}: a damaged zip archive ({exc})")
        return "zip"
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            out.merge(UNREADABLE, (), f"{where}: {len(infos)} archive members, more than {MAX_ZIP_MEMBERS}")
            return "zip"
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            out.merge(UNREADABLE, (), f"{where}: the archive holds member {dup!r} twice (loaders disagree on which)")
            return "zip"
        torch_zip = any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)
        for info in infos:
            n = info.filename
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                out.merge(UNREADABLE, (), f"{where}: member {n!r} is encrypted")
                continue
            if torch_zip and "/data/" in f"/{n}" and not n.endswith(".pkl"):
                continue  # tensor storage bytes: torch reads them raw, never unpickles them
            if info.file_size > MAX_SCAN_BYTES:
                if n.endswith(".pkl"):
                    out.merge(UNREADABLE, (), f"{where}: member {n} is too large to scan ({info.file_size} bytes)")
                continue
            try:
                with zf.open(info) as m:
                    data = m.read(MAX_SCAN_BYTES + 1)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
                out.merge(UNREADABLE, (), f"{where}: member {n} cannot be read ({exc})")
                continue
            inner = f"{where}:{n}"
            if data[:4] == b"PK\x03\x04":
                if depth >= MAX_ZIP_DEPTH:
                    out.merge(UNREADABLE, (), f"{inner}: archives nested more than {MAX_ZIP_DEPTH} deep")
                else:
                    _scan_zip(io.BytesIO(data), inner, out, depth + 1)
            elif n.endswith(".pkl") or data[:1] == b"\x80":
                _scan_bytes(data, inner, out)
            elif data[:6] == b"\x93NUMPY":
                _scan_npy(io.BytesIO(data), inner, out)
        return "torch-zip" if torch_zip else "zip"


def _scan_npy(stream: Any, where: str, out: _Result) -> None:
    import numpy as np
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(stream)
        reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        _, _, dtype = reader(stream) if version in ((1, 0), (2, 0)) else npformat._read_array_header(stream, version)
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        out.merge(UNREADABLE, (), f"{where}: not a readable .npy header ({exc})")
        return
    if np.dtype(dtype).hasobject:  # the array data is a pickle (np.save with allow_pickle)
        _scan_bytes(stream.read(MAX_SCAN_BYTES + 1), f"{where} (object array)", out)


# ------------------------------------------------------------------------------------------------ entry point


def file_safety(path: Path | str) -> FileSafety:
    """Classify one file by its content (see the module docstring). Never unpickles, never imports what a pickle
    names; reads headers, pickle opcode streams and the first bytes of other files."""
    p = Path(path)
    if p.is_dir():
        return FileSafety(str(p), "directory", DATA, detail="directory")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        return FileSafety(str(p), "unknown", UNREADABLE, detail=f"cannot be read ({exc.strerror or exc})")
    if size == 0:
        return FileSafety(str(p), "unknown", UNREADABLE, detail="empty file (0 bytes)")
    if p.name == ".metadata" or p.suffix == ".distcp":
        from ckptaudit.io.safety_dcp import dcp_file_safety

        return dcp_file_safety(p)
    kind, out = _classify(p, head, size)
    if out.verdict == DATA and kind in ("text", "json", "protobuf") and p.suffix.lower() in PICKLE_SUFFIXES:
        out = _Result(UNREADABLE, details=[f"named like a pickle but holds {kind}, not one"])
    if out.verdict == DATA:
        detail = ""
    elif out.verdict == WEIGHTS_ONLY:
        detail = "weights-only loadable"
    else:
        detail = "; ".join(out.details[:3]) if out.details else out.verdict
    return FileSafety(str(p), kind, out.verdict, tuple(out.globals), detail, tuple(out.lists))


def _classify(p: Path, head: bytes, size: int) -> tuple[str, _Result]:
    out = _Result()
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if n > 0 and (head[8:9] == b"{" or (head[8:9] in (b" ", b"\t", b"\n", b"\r") and n <= size - 8)):
        from ckptaudit.io.safetensors_header import HeaderError, read_header_file

        try:
            read_header_file(p)
        except (HeaderError, OSError) as exc:
            out.merge(UNREADABLE, (), f"not a valid safetensors file ({exc})")
        return "safetensors", out
    if head[:4] == b"GGUF":
        from ckptaudit.errors import CkptAuditError
        from ckptaudit.io.formats import GGUFSource

        try:
            GGUFSource(p).close()
        except CkptAuditError as exc:
            out.merge(UNREADABLE, (), exc.message.split(": ", 1)[-1])
        return "gguf", out
    if head[:4] == b"PK\x03\x04":
        with open(p, "rb") as f:
            kind = _scan_zip(f, p.name, out)
        return kind, out
    if head[:6] == b"\x93NUMPY":
        with open(p, "rb") as f:
            _scan_npy(f, p.name, out)
        return "numpy", out
    if size <= MAX_SCAN_BYTES:
        data = p.read_bytes()
        if head[:1] == b"\x80":  # PROTO: a pickle of protocol 2+, or nothing loadable
            _scan_bytes(data, p.name, out)
            return "pickle", out
        probe = _Result()
        _scan_bytes(data, p.name, probe)
        if probe.verdict != UNREADABLE:  # the whole file parses as protocol-0/1 pickles: it is one
            return "pickle", probe
    elif head[:1] == b"\x80":
        out.merge(UNREADABLE, (), f"a pickle of {size} bytes, too large to scan")
        return "pickle", out
    return _classify_other(p, size, out)


def _classify_other(p: Path, size: int, out: _Result) -> tuple[str, _Result]:
    with open(p, "rb") as f:
        raw = f.read(MAX_TEXT_CHECK)
    text = _utf8_prefix(raw, complete=size <= MAX_TEXT_CHECK)
    if text is not None and "\x00" not in text:
        stripped = text.lstrip()
        if p.suffix.lower() == ".json" or (stripped[:1] in ("{", "[") and size <= MAX_TEXT_CHECK):
            from ckptaudit.errors import CkptAuditError
            from ckptaudit.io.jsonio import loads_bounded

            if size <= MAX_TEXT_CHECK:
                try:
                    loads_bounded(text, p.name, wide_ints=True)
                    return "json", out
                except CkptAuditError as exc:
                    if p.suffix.lower() == ".json":
                        out.merge(UNREADABLE, (), exc.message.split(": ", 1)[-1])
                        return "json", out
            else:
                return "json", out
        return "text", out
    if _is_protobuf(p, size):
        return "protobuf", out
    out.merge(UNREADABLE, (), f"not a format ckptaudit knows (first bytes {raw[:8]!r})")
    return "unknown", out


def _utf8_prefix(raw: bytes, complete: bool) -> str | None:
    """The text of ``raw`` when it is UTF-8 (a multi-byte character cut at the end of an incomplete read is
    allowed), else None."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not complete and exc.start >= len(raw) - 3:
            try:
                return raw[: exc.start].decode("utf-8")
            except UnicodeDecodeError:
                return None
        return None


def _is_protobuf(p: Path, size: int, limit: int = 64 * 1024 * 1024) -> bool:
    """True when the whole file parses as protobuf wire format (sentencepiece's tokenizer.model): fields with
    positive numbers, known wire types and lengths inside the file. Random bytes fail within a few fields."""
    if size > limit:
        return False
    data = p.read_bytes()
    pos, n, fields = 0, len(data), 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            if pos >= n or shift > 63:
                raise ValueError
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    try:
        while pos < n:
            key = varint()
            number, wire = key >> 3, key & 7
            if number == 0:
                return False
            if wire == 0:
                varint()
            elif wire == 1:
                pos += 8
            elif wire == 2:
                pos += varint()
            elif wire == 5:
                pos += 4
            else:
                return False
            if pos > n:
                return False
            fields += 1
    except ValueError:
        return False
    return fields > 0


def is_safe(path: Path | str) -> bool:
    """Shorthand: ``file_safety(path).safe``."""
    return file_safety(path).safe

