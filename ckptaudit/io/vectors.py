"""Backbone-vector files written by ``ckptaudit backbone --save-vectors``: the one reader.

Layout (``analyses/backbone.save_backbone_vectors``): one entry per stored tensor, key = tensor name, value
``[k, *tensor_shape]`` with entry j = V_{j+1} on that tensor (zero outside the trunk pieces; V_1 is the backbone
direction v_b); an entry of shape ``[*tensor_shape]`` (hand-made files) counts as k = 1. Optional entries
``switch/<tensor name>`` of shape ``tensor_shape`` hold a switching direction. Metadata (str -> str): k,
anchor_step, steps, sigma, group, normalize_rows, layout.

:func:`read_vectors` opens the file once through :class:`ckptaudit.io.safetensors_source.SafetensorsSource` (positioned
reads, nothing memory-mapped) and reads only the tensors the caller names, and of each only its first ``rows``
rows, so memory is what the caller keeps, not the size of the file. Every problem is a
:class:`~ckptaudit.errors.CkptAuditError` naming the file and, where there is one, the tensor.

Writing: the backbone's vectors pass hands its entries, one stored tensor at a time, to a :class:`VectorSink`.
:class:`SafetensorsVectorSink` streams them into the file above (at most one entry in memory);
:class:`MemoryVectorSink` keeps them (the same float32 values) for an analysis in the same process, and
:func:`read_vectors` reads either.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ckptaudit.errors import CorruptFileError, InputNotFoundError, LayoutError
from ckptaudit.io.safetensors_source import SafetensorsSource
from ckptaudit.io.writer import SafetensorsStreamWriter

__all__ = ["BLOCK_PREFIX", "SWITCH_PREFIX", "MemoryVectorSink", "OpenVectors", "SafetensorsVectorSink", "VectorFile",
           "VectorSink", "open_vectors", "read_vectors", "vector_sink"]

SWITCH_PREFIX = "switch/"
BLOCK_PREFIX = "block/"  # block/<tensor>: the backbone of the tensor's own block (its PC1)
WRITE_HINT = "write one with `ckptaudit backbone --save-vectors`"
REWRITE_HINT = "the vectors file is damaged or incomplete: write it again with `ckptaudit backbone --save-vectors`"
SIZE_HINT = "the vectors were computed on another model size"
ARCH_HINT = "the vectors were computed on another architecture"


Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


@runtime_checkable
class VectorSink(Protocol):
    """Where the entries of a vectors pass go. :meth:`begin` declares every entry (name -> (shape, dtype), in the
    order they will be written) and the metadata (str -> str); :meth:`write` then receives each entry once, in that
    order; :meth:`close` completes the set, :meth:`abort` drops what was written. ``location``: the file path
    reported as the result's ``vectors``, None when nothing is written to disk."""

    location: str | None

    def begin(self, specs: Specs, metadata: Mapping[str, str]) -> None: ...

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class SafetensorsVectorSink:
    """The vectors file at ``path`` (``backbone --save-vectors``), written entry by entry: at most one entry is in
    memory, and the file appears only once complete (:class:`ckptaudit.io.writer.SafetensorsStreamWriter`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.location: str | None = str(path)
        self._writer: SafetensorsStreamWriter | None = None

    def begin(self, specs: Specs, metadata: Mapping[str, str]) -> None:
        self._writer = SafetensorsStreamWriter(self.path, specs, metadata)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert self._writer is not None, "begin() first"
        self._writer.write(name, tensor)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class MemoryVectorSink:
    """The entries kept in memory (CPU, in their declared dtype: the values a file would hold), for an analysis of
    the same process (``fisher`` without ``--vectors``, the gate). ``label`` names them in error messages.
    Holds D x k floats: for the trunk of a large model write a file instead."""

    location: str | None = None

    def __init__(self, label: str = "backbone vectors (in memory)"):
        self.label = label
        self.tensors: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.complete = False

    def __str__(self) -> str:
        return self.label

    def begin(self, specs: Specs, metadata: Mapping[str, str]) -> None:
        self._specs = {str(n): (tuple(int(x) for x in shape), dtype) for n, (shape, dtype) in specs.items()}
        self.metadata = {str(k): str(v) for k, v in metadata.items()}
        self.tensors = {}
        self.complete = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        order = list(self._specs)
        expect = order[len(self.tensors)] if len(self.tensors) < len(order) else None
        shape, dtype = self._specs.get(name, ((), torch.float32))
        if name != expect or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {expect} {self._specs.get(expect or '', ((),))[0]}, got {name} "
                             f"{tuple(tensor.shape)}")
        self.tensors[name] = tensor.detach().to("cpu", dtype).contiguous().clone()

    def close(self) -> None:
        if len(self.tensors) != len(self._specs):
            n, total = len(self.tensors), len(self._specs)
            self.abort()
            raise ValueError(f"only {n} of {total} tensors were written")
        self.complete = True

    def abort(self) -> None:
        self.tensors = {}
        self.complete = False

    def share(self, ctx: Any) -> None:
        """Rank 0's entries and metadata on every rank of ``ctx`` (an object with ``is_main`` and
        ``broadcast(ndarray) -> ndarray``, as :class:`ckptaudit.analyses.distributed.DistContext`)."""
        import json

        head = b""
        if ctx.is_main:
            head = json.dumps({"metadata": self.metadata,
                               "entries": [[n, list(t.shape), str(t.dtype).replace("torch.", "")]
                                           for n, t in self.tensors.items()]}).encode()
        size = int(ctx.broadcast(np.array([len(head)], dtype=np.int64))[0])
        raw = ctx.broadcast(np.frombuffer(head, dtype=np.uint8) if ctx.is_main else np.zeros(size, dtype=np.uint8))
        doc = json.loads(raw.tobytes().decode())
        specs = {n: (tuple(shape), getattr(torch, dt)) for n, shape, dt in doc["entries"]}
        if not ctx.is_main:
            self.begin(specs, doc["metadata"])
        for n, (shape, dtype) in specs.items():
            t = self.tensors[n] if ctx.is_main else torch.zeros(shape, dtype=dtype)
            got = torch.from_numpy(ctx.broadcast(t.numpy()))
            if not ctx.is_main:
                self.write(n, got)
        if not ctx.is_main:
            self.close()

    def source(self) -> _MemorySource:
        """The entries through the reading interface of :class:`SafetensorsSource` (keys, shape, read_flat)."""
        return _MemorySource(self)


class _MemorySource:
    def __init__(self, sink: MemoryVectorSink):
        self._t = sink.tensors
        self.metadata = dict(sink.metadata)

    def __enter__(self) -> _MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._t[name].reshape(-1)[start:stop]


def vector_sink(target: str | Path | VectorSink | None) -> VectorSink | None:
    """``target`` as a sink: a path -> :class:`SafetensorsVectorSink` there; a sink or None as given."""
    if target is None or isinstance(target, VectorSink):
        return target
    return SafetensorsVectorSink(target)


@dataclass(frozen=True, eq=False)
class VectorFile:
    """What :func:`read_vectors` read. ``stacks``: tensor name -> float64 ``[k, *tensor_shape]`` (row j = V_{j+1},
    as stored, not renormalised); every stack has the same ``k``. ``switch``: tensor name -> float64
    ``[*tensor_shape]`` (empty when the file has no switching direction or it was not asked for). ``metadata``:
    the file's safetensors metadata. ``block``: tensor name -> float64 ``[*tensor_shape]``, the backbone of that
    tensor's own block (files written since block backbones were added; empty otherwise or when not asked for)."""

    path: Path | MemoryVectorSink
    stacks: dict[str, torch.Tensor]
    switch: dict[str, torch.Tensor]
    metadata: dict[str, str]
    block: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Rows read per tensor (the file's k, capped by ``rows``)."""
        return int(next(iter(self.stacks.values())).shape[0])

    def row(self, j: int) -> dict[str, torch.Tensor]:
        """V_{j+1} by tensor name (views of the stacks), ``[*tensor_shape]`` each."""
        return {n: t[j] for n, t in self.stacks.items()}

    def backbone(self, unit: bool = False) -> dict[str, torch.Tensor]:
        """v_b = V_1 by tensor name; with ``unit``, divided by its norm over the tensors read."""
        v = self.row(0)
        if not unit:
            return v
        norm = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
        return {n: x / norm for n, x in v.items()}


def _stack_rows(path: Any, name: str, stored: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """k of entry ``name``: ``[k, *shape]`` -> k, ``shape`` itself -> 1; any other shape is an error naming both."""
    if stored == shape:
        return 1
    if len(stored) == len(shape) + 1 and stored[1:] == shape:
        return stored[0]
    raise CorruptFileError(f"{path}: vector tensor {name} has shape {stored}, the model's tensor {shape}",
                           hint=SIZE_HINT)


def _read_rows(src: Any, key: str, start: int, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows ``start .. start + rows`` of entry ``key`` as float64 ``[rows, *shape]`` (only those bytes are read)."""
    numel = math.prod(shape)
    try:
        flat = src.read_flat(key, start * numel, (start + rows) * numel)
    except (CorruptFileError, LayoutError) as exc:  # truncated data, a dtype torch cannot hold
        raise CorruptFileError(exc.message, hint=REWRITE_HINT) from None
    return flat.to(torch.float64).reshape(rows, *shape)


@dataclass(frozen=True, eq=False)
class OpenVectors:
    """A vectors file (or MemoryVectorSink) whose headers :func:`open_vectors` checked: what it will read, and
    the reads, one tensor and one row at a time. ``names``: the vector entries read, in the caller's order;
    ``k``: rows read of each; ``switch_names`` / ``block_names``: the tensors with a ``switch/`` / ``block/`` entry
    read (all of ``names`` or none / where present)."""

    path: Path | MemoryVectorSink
    names: tuple[str, ...]
    k: int
    switch_names: tuple[str, ...]
    block_names: tuple[str, ...]
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    _src: Any

    def row(self, name: str, j: int) -> torch.Tensor:
        """V_{j+1} on tensor ``name``, float64 ``[*shape]``."""
        return _read_rows(self._src, name, j, 1, self.shapes[name])[0]

    def rows(self, name: str) -> torch.Tensor:
        """V_1..V_k on tensor ``name``, float64 ``[k, *shape]``."""
        return _read_rows(self._src, name, 0, self.k, self.shapes[name])

    def switch(self, name: str) -> torch.Tensor:
        return _read_rows(self._src, SWITCH_PREFIX + name, 0, 1, self.shapes[name])[0]

    def block(self, name: str) -> torch.Tensor:
        return _read_rows(self._src, BLOCK_PREFIX + name, 0, 1, self.shapes[name])[0]

    def check_backbone(self, sq: float) -> None:
        """Raise the file's error when ``sq``, the squared norm of V_1 over the tensors read, is zero or not finite."""
        if not math.isfinite(sq) or sq == 0.0:
            what = "zero" if sq == 0.0 else "not finite"
            raise CorruptFileError(f"{self.path}: the backbone vector V_1 is {what} on the {len(self.names)} "
                                   f"tensor(s) read", hint="check that the vectors belong to this model, or write "
                                   "them again with `ckptaudit backbone --save-vectors`")


@contextlib.contextmanager
def open_vectors(
    path: str | Path | MemoryVectorSink,
    shapes: Mapping[str, Sequence[int]],
    *,
    rows: int | None = None,
    switch: bool = False,
    partial: bool = False,
    block: bool = False,
) -> Iterator[OpenVectors]:
    """Open and check the backbone vectors of the tensors in ``shapes`` (tensor name -> the model's shape of that
    tensor), reading no data yet: the options and errors of :func:`read_vectors`, except that V_1 being zero is
    the caller's check (:meth:`OpenVectors.check_backbone`) once it has read it."""
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    want = {str(n): tuple(int(x) for x in s) for n, s in shapes.items()}
    src: Any
    if isinstance(path, MemoryVectorSink):
        if not path.complete:
            raise InputNotFoundError(f"{path}: no vectors were written", hint=WRITE_HINT)
        src = path.source()
    else:
        path = Path(path)
        if not path.is_file():
            raise InputNotFoundError(f"{path}: no such vectors file", hint=WRITE_HINT)
        try:
            src = SafetensorsSource(path)
        except CorruptFileError as exc:  # bad length, header not JSON, offsets outside the file...
            raise CorruptFileError(exc.message, hint=REWRITE_HINT) from None
    with src:
        keys = set(src.keys())
        if partial:
            unknown = sorted(k for k in keys if not k.startswith((SWITCH_PREFIX, BLOCK_PREFIX)) and k not in want)
            if unknown:
                raise CorruptFileError(f"{path}: vector tensor {unknown[0]} is not a parameter of the model"
                                       + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                                       hint=ARCH_HINT)
            names = [n for n in want if n in keys]
        else:
            missing = [n for n in want if n not in keys]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                hint = ARCH_HINT
                if all(n.endswith(".bias") for n in missing):
                    hint = "the vectors hold weights only: write them with `ckptaudit backbone --include-bias` too"
                raise CorruptFileError(f"{path}: no vector entry for tensor {missing[0]}{more}", hint=hint)
            names = list(want)
        if not names:
            raise CorruptFileError(f"{path}: holds no backbone vector (no entry keyed by a tensor name)",
                                   hint=WRITE_HINT)
        # Check every shape before reading any data, then read only the rows every entry has.
        ks = {n: _stack_rows(path, n, tuple(src.shape(n)), want[n]) for n in names}
        k = min(ks.values()) if rows is None else min(rows, *ks.values())
        if k == 0:
            empty = next(n for n, kn in ks.items() if kn == 0)
            raise CorruptFileError(f"{path}: vector tensor {empty} holds no vectors (k = 0)", hint=REWRITE_HINT)
        sw_names = [n for n in names if SWITCH_PREFIX + n in keys] if switch else []
        if sw_names and len(sw_names) != len(names):
            lacking = next(n for n in names if n not in sw_names)
            raise CorruptFileError(f"{path}: the switching direction covers {len(sw_names)} of the {len(names)} "
                                   f"tensors read (no {SWITCH_PREFIX}{lacking})", hint=REWRITE_HINT)
        for n in sw_names:
            stored = tuple(src.shape(SWITCH_PREFIX + n))
            if stored != want[n] and stored != (1, *want[n]):
                raise CorruptFileError(f"{path}: vector tensor {SWITCH_PREFIX}{n} has shape {stored}, the model's "
                                       f"tensor {want[n]}", hint=SIZE_HINT)
        own = [n for n in (names if block else []) if BLOCK_PREFIX + n in keys]
        for n in own:
            stored = tuple(src.shape(BLOCK_PREFIX + n))
            if stored != want[n]:
                raise CorruptFileError(f"{path}: vector tensor {BLOCK_PREFIX}{n} has shape {stored}, the "
                                       f"model's tensor {want[n]}", hint=SIZE_HINT)
        yield OpenVectors(path, tuple(names), k, tuple(sw_names), tuple(own), dict(src.metadata),
                          {n: want[n] for n in names}, src)


def read_vectors(
    path: str | Path | MemoryVectorSink,
    shapes: Mapping[str, Sequence[int]],
    *,
    rows: int | None = None,
    switch: bool = False,
    partial: bool = False,
    block: bool = False,
) -> VectorFile:
    """Read the backbone vectors of the tensors in ``shapes`` (tensor name -> the model's shape of that tensor).

    ``partial`` False: every tensor of ``shapes`` must be in the file (a missing one is an error naming it);
    the file's other entries are not read. ``partial`` True: the file may cover only some of ``shapes`` (the
    others are absent from the result), but every vector entry it holds must be one of them. ``switch/`` entries
    are never vector entries, nor are ``block/`` entries. ``rows``: read at most this many rows (V_1..V_rows) of each
    entry, None = all. ``block``: also read ``block/<name>`` where the file has it (the tensor's block backbone).
    ``switch``: also read ``switch/<name>`` of every tensor read (all or none of them must have one).

    Errors: a missing file -> InputNotFoundError; not safetensors, truncated, or a dtype torch cannot hold ->
    CorruptFileError; an entry whose shape is neither ``[k, *shape]`` nor ``shape``, a missing or unknown
    tensor, no vector entry at all, k = 0, or V_1 zero / not finite on the tensors read -> CorruptFileError.
    ``path`` may also be a completed :class:`MemoryVectorSink` (the same checks, messages naming its label).
    To read tensor by tensor instead of all at once: :func:`open_vectors`.
    """
    with open_vectors(path, shapes, rows=rows, switch=switch, partial=partial, block=block) as ov:
        stacks = {n: ov.rows(n) for n in ov.names}
        sw = {n: ov.switch(n) for n in ov.switch_names}
        own = {n: ov.block(n) for n in ov.block_names}
        ov.check_backbone(sum(float((t[0] * t[0]).sum()) for t in stacks.values()))
        return VectorFile(ov.path, stacks, sw, ov.metadata, own)
