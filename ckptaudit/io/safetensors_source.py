"""Safetensors checkpoints: one file read with positioned reads, or shards behind a ``*.index.json``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ckptaudit.errors import CorruptFileError, InputNotFoundError, LayoutError
from ckptaudit.io.detect import _MAX_INDEX_BYTES, detect_format
from ckptaudit.io.source import _RESAVE_HINT, TensorSource, _check_range, _out_view

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dt
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
        ("C64", "complex64"),
    ]
    if (dt := getattr(torch, attr, None)) is not None
}


# Bytes per element of every safetensors dtype code (including ones torch cannot hold, for header checks).
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                         "C64": 8}


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from file offset ``offset`` with positioned reads (no seek; safe across threads; the GIL
    is released while the kernel copies). Returns the number of bytes read (< len(buf) only at end of file)."""
    done, n = 0, len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


class SafetensorsSource(TensorSource):
    """One .safetensors file. The header (8-byte little-endian length, JSON) is parsed and checked once; every
    read is a positioned read of exactly the requested bytes into a fresh buffer (``os.preadv``), so nothing is
    memory-mapped and only the buffers handed out count towards resident memory. Keys are in sorted order (as
    ``safetensors.safe_open`` lists them)."""

    ranged_reads = True

    def __init__(self, path: Path):
        super().__init__(path, "safetensors")
        self._fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise InputNotFoundError(f"{self.path}: no such file", hint="check the path") from None
        except OSError as exc:
            raise CorruptFileError(f"{self.path}: cannot be opened ({exc})", hint=_RESAVE_HINT) from None
        try:
            self._entries, self._data_start = self._parse_header(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._keys = sorted(self._entries)

    def _bad(self, why: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path}: not a valid safetensors file ({why})", hint=_RESAVE_HINT)

    def _parse_header(self, fd: int) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
        from ckptaudit.io.safetensors_header import HeaderError, read_header

        try:
            header = read_header(fd)
        except HeaderError as exc:
            raise self._bad(str(exc)) from None
        self.metadata: dict[str, str] = dict(header.metadata or {})
        entries = {name: (e.dtype, e.shape, e.begin, e.end) for name, e in header.tensors.items()}
        return entries, header.data_start

    def _entry(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise self._missing(name) from None

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)[0]
        try:
            return _SAFETENSORS_DTYPES[code]
        except KeyError:
            raise LayoutError(f"{self.path}: tensor {name!r} has dtype {code}, which torch cannot hold") from None

    def _read(self, name: str, byte_offset: int, out: torch.Tensor) -> torch.Tensor:
        if self._fd is None:
            raise ValueError(f"{self.path}: the source is closed")
        nbytes = out.numel() * out.element_size()
        if nbytes:
            raw = out.reshape(-1).view(torch.uint8).numpy()
            got = _pread_into(self._fd, memoryview(raw).cast("B"), self._data_start + byte_offset)
            if got != nbytes:
                raise CorruptFileError(f"{self.path}: cannot read tensor {name!r} (the file ends early)",
                                       hint=_RESAVE_HINT)
        return out

    def get(self, name: str) -> torch.Tensor:
        code, shape, begin, _ = self._entry(name)
        return self._read(name, begin, torch.empty(shape, dtype=self.dtype(name)))

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        code, shape, begin, _ = self._entry(name)
        dtype = self.dtype(name)
        total = 1
        for x in shape:
            total *= x
        _check_range(self, name, start, stop, total)
        n = int(stop) - int(start)
        target = torch.empty(n, dtype=dtype) if out is None else _out_view(self, name, out, dtype, n)
        return self._read(name, begin + int(start) * _SAFETENSORS_ITEMSIZE[code], target)

    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def read_index(index_path: Path | str) -> dict[str, Path]:
    """The weight map of a sharded-checkpoint index (``*.index.json``): tensor name -> shard path.

    The index is read with io.jsonio's limits. Refused with CorruptFileError naming the index: a missing or empty
    ``weight_map``, one that is not an object of name -> file name, a shard path that is absolute or leaves the
    index's folder (``..``), or one that names the index itself.
    """
    from ckptaudit.io.jsonio import read_json

    p = Path(index_path)
    index = read_json(p, max_bytes=_MAX_INDEX_BYTES, hint=_RESAVE_HINT)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        got = "none" if weight_map is None else type(weight_map).__name__
        raise CorruptFileError(f"{p}: 'weight_map' must be an object of tensor name -> shard file, got {got}",
                               hint=_RESAVE_HINT)
    if not weight_map:
        raise CorruptFileError(f"{p}: 'weight_map' is empty: the index names no tensor", hint=_RESAVE_HINT)
    root = p.parent
    out: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CorruptFileError(f"{p}: weight_map[{name[:60]!r}] must be a shard file name, got {shard!r}"[:200],
                                   hint=_RESAVE_HINT)
        rel = Path(shard)
        if rel.is_absolute() or ".." in rel.parts or "\x00" in shard:
            raise CorruptFileError(f"{p}: weight_map[{name[:60]!r}] = {shard[:80]!r} leaves the index's folder",
                                   hint="shard paths must be file names beside the index")
        target = root / rel
        if target.name == p.name and target.parent.resolve() == root.resolve():
            raise CorruptFileError(f"{p}: weight_map[{name[:60]!r}] names the index itself",
                                   hint="the weight_map must name weight files (an index naming itself loops)")
        out[name] = target
    return out


class ShardedSource(TensorSource):
    """A checkpoint split over several files by a ``*.index.json`` weight map; each shard opened on first use."""

    def __init__(self, index_path: Path):
        super().__init__(index_path, "safetensors-index")
        self._map: dict[str, Path] = read_index(index_path)
        self._files = list(dict.fromkeys(self._map.values()))
        missing = [f.name for f in self._files if not f.is_file()]
        if missing:
            raise InputNotFoundError(
                f"{index_path}: shard file(s) named in the index are missing: {', '.join(missing)}",
                hint="copy every shard next to the index (an interrupted download or copy?)",
            )
        self._open: dict[Path, TensorSource] = {}
        self._checked: set[Path] = set()
        for f in self._files:  # safetensors shards: headers only, so every command sees a consistent index
            if detect_format(f) == "safetensors":
                self._check_shard(f, SafetensorsSource(f))

    def _check_shard(self, f: Path, src: TensorSource, keep_open: bool = False) -> None:
        """The index and shard ``f`` agree: every tensor the map places in ``f`` is there, and every tensor of ``f``
        is in the map, placed in ``f`` (a shard's tensor that the map omits or sends elsewhere is refused, not
        silently dropped)."""
        try:
            if src.format in ("safetensors-index", "dcp"):
                raise CorruptFileError(f"{self.path}: shard {f.name} is itself a {src.format}, not a weight file",
                                       hint="the weight_map must name weight files (an index naming an index loops)")
            have = set(src.keys())
            want = {k for k, v in self._map.items() if v == f}
            absent = sorted(want - have)
            if absent:
                raise CorruptFileError(
                    f"{self.path}: the weight_map places {len(absent)} tensor(s) in {f.name} that it does not hold "
                    f"({', '.join(absent[:3])})", hint=_RESAVE_HINT)
            stray = sorted(have - want)
            if stray:
                what = "places in another shard" if any(k in self._map for k in stray) else "omits"
                raise CorruptFileError(
                    f"{self.path}: shard {f.name} holds {len(stray)} tensor(s) that the weight_map {what} "
                    f"({', '.join(stray[:3])})", hint=_RESAVE_HINT)
        except BaseException:
            src.close()
            raise
        self._checked.add(f)
        if not keep_open:
            src.close()

    def _shard(self, name: str) -> TensorSource:
        try:
            f = self._map[name]
        except KeyError:
            raise self._missing(name) from None
        if f not in self._open:
            if detect_format(f) == "safetensors-index":
                raise CorruptFileError(f"{self.path}: shard {f.name} is itself an index, not a weight file",
                                       hint="the weight_map must name weight files (an index naming an index loops)")
            from ckptaudit.io.tensors import _open_file  # the opener of every format (imports this module)

            src = _open_file(f)
            if f not in self._checked:
                self._check_shard(f, src, keep_open=True)
            self._open[f] = src
        return self._open[f]

    def keys(self) -> list[str]:
        return list(self._map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._shard(name).dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self._shard(name).get(name)

    @property
    def ranged_reads(self) -> bool:  # type: ignore[override]
        """True when every shard is a safetensors file (checked from the shards' first bytes, once)."""
        if getattr(self, "_ranged", None) is None:
            try:
                self._ranged = all(detect_format(f) == "safetensors" for f in self._files)
            except LayoutError:
                self._ranged = False
        return bool(self._ranged)

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._shard(name).read_flat(name, start, stop, out)

    def files(self) -> list[Path]:
        return list(self._files)

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()
