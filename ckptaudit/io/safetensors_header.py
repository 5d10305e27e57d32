"""The safetensors header, validated exactly as the safetensors library validates it, before any tensor is trusted.

A file is ``N`` (8 bytes, little-endian u64) + ``N`` bytes of UTF-8 JSON + the data section. The rules, as the
library (``safetensors`` 0.4 - 0.8, Rust ``Metadata::validate``) applies them:

- the file has at least 8 bytes; ``N`` <= 100,000,000 and 8 + ``N`` <= the file size;
- the header is UTF-8 and one strict JSON object (no NaN/Infinity, no lone surrogate escapes, at most 127 levels
  of nesting; JSON whitespace may surround it);
- ``__metadata__`` is absent, null, or an object of string -> string;
- every other key is a tensor: an object with ``dtype`` (a known dtype code), ``shape`` (an array of non-negative
  integers < 2**64) and ``data_offsets`` (two such integers), each given once; other members are ignored. A tensor
  name given twice keeps its last entry (as the library's map does);
- sorted by offsets, the tensors tile the data section from byte 0: each begins where the previous one ended and
  ends at or after it begins, and the last ends exactly at the end of the file (no trailing bytes);
- each tensor's byte length equals product(shape) x the dtype's bits / 8, with the product computed in u64 left to
  right (an intermediate overflow refuses the file even when a later dimension is 0) and a whole number of bytes.

ckptaudit adds one rule of its own: every dimension fits int64 (a tensor with a dimension of 2**63 cannot be held
by torch, though the library accepts such a file when another dimension is 0).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

MAX_HEADER_BYTES = 100_000_000
MAX_HEADER_DEPTH = 127
_U64 = 2**64 - 1
_I64 = 2**63 - 1

#: Bits per element of every dtype code the safetensors library knows.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64,
}

_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


class HeaderError(ValueError):
    """Why a header breaks the rules (the caller adds the file name)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: dtype code, shape, and [begin, end) byte offsets within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: tensors by name (sorted by name), ``__metadata__`` (None when absent or null), where the
    data section starts in the file and its length in bytes."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None
    data_start: int
    data_len: int


class _Pairs(list):
    """An object's members in file order (duplicates kept), so that the rules on repeated keys can be applied."""


def _no_constant(name: str) -> float:
    raise HeaderError(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise HeaderError(f"number {text[:30]} is out of range")
    return value


def _int(text: str) -> int:
    value = int(text)
    try:
        float(value)
    except OverflowError:  # serde_json reads integers beyond u64 as doubles, and refuses what overflows one
        raise HeaderError(f"number {text[:30]}... is out of range") from None
    return value


def _strict_strings(obj: object) -> None:
    """Refuse lone surrogates anywhere (serde_json does; Python's json accepts "\\ud800")."""
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, str):
            try:
                cur.encode("utf-8")
            except UnicodeEncodeError:
                raise HeaderError("a string holds a lone surrogate escape") from None
        elif isinstance(cur, list):  # _Pairs included
            for item in cur:
                if isinstance(cur, _Pairs):
                    stack.extend(item)
                else:
                    stack.append(item)


def _depth(obj: object) -> int:
    best, stack = 0, [(obj, 1)]
    while stack:
        cur, d = stack.pop()
        if not isinstance(cur, list):
            continue
        best = max(best, d)
        if isinstance(cur, _Pairs):
            stack.extend((v, d + 1) for _, v in cur)
        else:
            stack.extend((v, d + 1) for v in cur)
    return best


def _usize(value: object, what: str) -> int:
    if type(value) is not int or value < 0 or value > _U64:
        raise HeaderError(f"{what} must be an integer in [0, 2**64), got {value!r}"[:160])
    return value


def parse_header_json(raw: bytes) -> tuple[dict[str, TensorEntry], dict[str, str] | None]:
    """The tensors and metadata of header bytes ``raw``; HeaderError when they break the JSON or entry rules."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"the header is not UTF-8 (byte {exc.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_no_constant, parse_float=_float,
                         parse_int=_int)
    except HeaderError:
        raise
    except RecursionError:
        raise HeaderError(f"the header nests more than {MAX_HEADER_DEPTH} levels") from None
    except ValueError as exc:
        raise HeaderError(f"the header is not JSON ({getattr(exc, 'msg', exc)})") from None
    if _depth(doc) > MAX_HEADER_DEPTH:
        raise HeaderError(f"the header nests more than {MAX_HEADER_DEPTH} levels")
    _strict_strings(doc)
    if not isinstance(doc, _Pairs):
        raise HeaderError("the header is not a JSON object")
    metadata: dict[str, str] | None = None
    seen_meta = False
    tensors: dict[str, TensorEntry] = {}
    for name, value in doc:
        if name == "__metadata__":
            if seen_meta:
                raise HeaderError("__metadata__ is given twice")
            seen_meta = True
            if value is None:
                continue
            if not isinstance(value, _Pairs) or not all(isinstance(v, str) for _, v in value):
                raise HeaderError("__metadata__ must be an object of string -> string")
            metadata = dict(value)
            continue
        tensors[name] = _entry(name, value)  # a repeated name keeps its last entry, as the library's map does
    return dict(sorted(tensors.items())), metadata


def _entry(name: str, value: object) -> TensorEntry:
    shown = repr(name[:60])
    if not isinstance(value, _Pairs):
        raise HeaderError(f"tensor {shown}: expected an object with dtype, shape, data_offsets")
    fields: dict[str, object] = {}
    for key, v in value:
        if key in _TENSOR_FIELDS:
            if key in fields:
                raise HeaderError(f"tensor {shown}: {key} is given twice")
            fields[key] = v
    missing = [k for k in _TENSOR_FIELDS if k not in fields]
    if missing:
        raise HeaderError(f"tensor {shown}: no {', '.join(missing)}")
    dtype = fields["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"tensor {shown}: unknown dtype {dtype!r}"[:160])
    shape, offsets = fields["shape"], fields["data_offsets"]
    if isinstance(shape, _Pairs) or not isinstance(shape, list):
        raise HeaderError(f"tensor {shown}: shape must be an array of integers")
    if isinstance(offsets, _Pairs) or not isinstance(offsets, list) or len(offsets) != 2:
        raise HeaderError(f"tensor {shown}: data_offsets must be two integers [begin, end]")
    dims = tuple(_usize(x, f"tensor {shown}: a dimension") for x in shape)
    begin, end = (_usize(x, f"tensor {shown}: a data offset") for x in offsets)
    return TensorEntry(dtype, dims, begin, end)


def validate_layout(tensors: dict[str, TensorEntry], data_len: int) -> None:
    """The offset and size rules of the module docstring; HeaderError naming the first tensor that breaks them."""
    start = 0
    for name, e in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        shown = repr(name[:60])
        if e.begin != start or e.end < e.begin:
            raise HeaderError(f"tensor {shown}: data offsets [{e.begin}, {e.end}] do not follow the previous tensor "
                              f"(which ends at {start}): tensors must tile the data section without gaps or overlaps")
        start = e.end
        numel = 1
        for d in e.shape:
            numel *= d
            if numel > _U64:
                raise HeaderError(f"tensor {shown}: the size of shape {list(e.shape)} overflows 64 bits")
        nbits = numel * DTYPE_BITS[e.dtype]
        if nbits > _U64:
            raise HeaderError(f"tensor {shown}: the size of shape {list(e.shape)} overflows 64 bits")
        if nbits % 8:
            raise HeaderError(f"tensor {shown}: {numel} elements of {e.dtype} are not a whole number of bytes")
        if e.end - e.begin != nbits // 8:
            raise HeaderError(f"tensor {shown}: {e.end - e.begin} bytes for shape {list(e.shape)} of {e.dtype} "
                              f"({nbits // 8} expected)")
    if start != data_len:
        if start < data_len:
            raise HeaderError(f"{data_len - start} bytes after the last tensor: the data section is not fully covered")
        raise HeaderError(f"the tensors need {start} bytes, the data section has {data_len} (truncated file?)")
    big = next((n for n, e in tensors.items() if any(d > _I64 for d in e.shape)), None)
    if big is not None:
        raise HeaderError(f"tensor {big[:60]!r}: a dimension of {list(tensors[big].shape)} does not fit int64")


def read_header(fd: int) -> Header:
    """Read and validate the header of the safetensors file open as ``fd`` (positioned reads; the offset of
    ``fd`` is left alone). HeaderError says which rule the file breaks."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise HeaderError(f"{size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"the header claims {n} bytes, more than the format's limit of {MAX_HEADER_BYTES}")
    if 8 + n > size:
        raise HeaderError(f"the header claims {n} bytes, the file has {size - 8} after the length (truncated file?)")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise HeaderError("the file ends inside the header")
    tensors, metadata = parse_header_json(raw)
    data_len = size - 8 - n
    validate_layout(tensors, data_len)
    return Header(tensors, metadata, 8 + n, data_len)


def read_header_file(path: str | os.PathLike) -> Header:
    """``read_header`` of the file at ``path`` (OSError when it cannot be opened)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return read_header(fd)
    finally:
        os.close(fd)
