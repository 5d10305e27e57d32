"""Lazy tensors of one checkpoint, whatever its format, behind one interface (``TensorSource``).

Formats are recognised by their first bytes, never by file extension. Every reader answers ``keys()``,
``shape()`` and ``dtype()`` from headers alone and reads one tensor's bytes per ``get()``:

- safetensors: the header is parsed once; tensor bytes are read with positioned reads (``os.preadv``) into
  freshly allocated buffers, never memory-mapped, so the resident memory of a process that reads many
  checkpoints stays flat; sharded checkpoints through their ``*.index.json`` weight map, each shard opened on
  first use;
- torch pickles (zip or legacy): ``torch.load(weights_only=True)``, memory-mapped when the file is a zip, with
  the state dict found under "state_dict" / "model_state_dict" / "model" / "module";
- GGUF: ``gguf.GGUFReader`` (memory-mapped); quantised tensors are dequantised to float32 on ``get``;
- torch.distributed.checkpoint folders: see ``ckptaudit.io.dcp`` (restricted metadata unpickler).

Besides whole tensors, every source answers ranged reads: ``read_flat(name, start, stop)`` returns elements
[start, stop) of the row-major flattened tensor in its stored dtype. Safetensors (single and sharded) read only
those bytes (``ranged_reads = True``); the other formats fetch the tensor once and slice it, keeping that one
tensor until another is asked for.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError, InputNotFoundError, LayoutError, UnsafePickleError

FORMATS = ("safetensors", "safetensors-index", "torch-zip", "torch-legacy", "gguf", "dcp")

# Keys under which training frameworks nest the model's state dict, most specific first
# (Lightning: "state_dict"; many scripts: "model_state_dict" / "model"; DeepSpeed and DDP wrappers: "module").
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")

# A JSON index larger than this is not an index (safetensors caps its own header at 100 MB as well).
_MAX_INDEX_BYTES = 100 * 1024 * 1024

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

_RESAVE_HINT = "the file is damaged or incomplete: re-save or re-download it"


class TensorNotFoundError(LayoutError, KeyError):
    """A tensor name that the checkpoint does not hold (also a KeyError, like a missing dict key)."""

    __str__ = Exception.__str__


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


# ------------------------------------------------------------------------------------------ opening


# Weight files of a checkpoint directory, in order of preference. Accelerate's save_state writes
# model.safetensors for its first model (model_0.safetensors in some versions), pytorch_model.bin without
# safetensors; HF Trainer with FSDP writes a DCP folder pytorch_model_fsdp_0/.
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILE_NAMES = ("model.safetensors", "model_0.safetensors", "pytorch_model.bin", "model.bin",
                     "pytorch_model_0.bin")
WEIGHT_DIR_NAMES = ("pytorch_model_fsdp_0",)
_LOOSE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf")


def find_weights(directory: Path | str) -> tuple[Path, tuple[Path, ...]] | None:
    """Where the model weights of a checkpoint directory live, or None when it has none.

    Returns (entry, files): ``entry`` is what ``open_tensors`` opens (a file, an index JSON or a DCP folder) and
    ``files`` the weight files behind it. Looks, in order, for: a DCP ``.metadata``; a sharded index; the
    standard single-file names (WEIGHT_FILE_NAMES); an FSDP DCP sub-folder; else exactly one *.safetensors /
    *.pt / *.pth / *.bin / *.ckpt / *.gguf file whose content is a checkpoint. Several candidates with no
    standard name -> LayoutError naming them.
    """
    d = Path(directory)
    if (d / ".metadata").is_file():
        return d, tuple(sorted(d.glob("*.distcp")))
    for name in WEIGHT_INDEX_NAMES:
        idx = d / name
        if idx.is_file():
            return idx, tuple(dict.fromkeys(read_index(idx).values()))
    for name in WEIGHT_FILE_NAMES:
        if (d / name).is_file():
            return d / name, (d / name,)
    for name in WEIGHT_DIR_NAMES:
        if (d / name / ".metadata").is_file():
            return d / name, tuple(sorted((d / name).glob("*.distcp")))
    candidates = []
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix.lower() in _LOOSE_SUFFIXES and not is_training_state_file(f.name):
            try:
                if detect_format(f) in ("safetensors", "torch-zip", "torch-legacy", "gguf"):
                    candidates.append(f)
            except LayoutError:
                continue
    if len(candidates) == 1:
        return candidates[0], (candidates[0],)
    if len(candidates) > 1:
        raise LayoutError(
            f"{d}: several weight files and none with a standard name: {', '.join(c.name for c in candidates)}",
            hint="pass the one you mean as a file",
        )
    return None


_TRAINING_STATE_RE = re.compile(
    r"^(optimizer(_\d+)?\.(pt|bin)|scheduler(_\d+)?\.(pt|bin)|sampler(_\d+)?\.bin|scaler\.pt|training_args\.bin"
    r"|rng_state(_\d+)?\.pth|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl)$"
)


def is_training_state_file(name: str) -> bool:
    """Optimizer/scheduler/RNG/args files that sit next to the weights in Trainer and Accelerate folders."""
    return bool(_TRAINING_STATE_RE.match(name))


def open_tensors(path: Path | str) -> TensorSource:
    """Open the tensors of one checkpoint: a weight file (any of FORMATS), an index JSON, or a checkpoint
    directory (Trainer / Accelerate / model folder / DCP folder; see ``find_weights``).

    Only headers are read here. Missing path -> InputNotFoundError; corrupt file -> CorruptFileError; a
    directory without weights -> LayoutError naming what it holds.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory", hint="check the path")
    if p.is_dir():
        found = find_weights(p)
        if found is None:
            seen = sorted(c.name for c in p.iterdir())[:12]
            raise LayoutError(
                f"{p}: no model weights found (contents: {', '.join(seen) or 'empty'})",
                hint="expected model.safetensors, a sharded index, pytorch_model.bin, *.pt, *.gguf or a DCP folder",
            )
        p = found[0]
        if p.is_dir():
            from ckptaudit.io.dcp import DCPSource

            return DCPSource(p)
    return _open_file(p)


def _open_file(p: Path) -> TensorSource:
    fmt = detect_format(p)
    if fmt == "safetensors":
        return SafetensorsSource(p)
    if fmt == "safetensors-index":
        return ShardedSource(p)
    if fmt in ("torch-zip", "torch-legacy"):
        from ckptaudit.io.formats import PickleSource

        return PickleSource(p, fmt)
    if fmt == "gguf":
        from ckptaudit.io.formats import GGUFSource

        return GGUFSource(p)
    from ckptaudit.io.dcp import DCPSource

    return DCPSource(p)
