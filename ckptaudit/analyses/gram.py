"""Streaming Gram engine: the T x T Gram matrix of drift rows, one tensor at a time.

Drift row of checkpoint t restricted to a group of pieces: x(t) = theta(t) - theta(anchor) over those pieces,
flattened. The engine returns G = X X^T (float64, shape [T, T], units: squared parameter units) for every group
without ever forming X: for each stored tensor name (outer loop) it reads the anchor's tensor and each
checkpoint's tensor once (from TensorSources opened once for the whole pass), takes the pieces, subtracts the
anchor in float64 (exact for fp32/bf16/fp16 inputs), stacks the T drift chunks into a [T, chunk] buffer and
accumulates ``G_piece += B @ B.T``. Each piece's Gram is computed once and added to every group that contains
the piece (a piece is typically in "trunk", "block_<l>" and "group_G"/"group_S").

Memory: the [T, chunk_elems] float64 buffer, the T + 1 copies of the current tensor in its stored dtype, and
the T x T Grams. A tensor is read whole (``TensorSource.get``), so the tensor term is T x (largest selected
tensor); it does not grow with model depth or with the number of tensors.

Partial Grams add: ``drift_grams(..., tensor_names=subset)`` over disjoint subsets sum to the full Gram
(:func:`sum_grams`), which is how the work splits across processes (``torch.distributed.all_reduce`` of the
stacked Grams; :func:`shard_tensor_names` gives each rank its subset).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.errors import LayoutError

DEFAULT_CHUNK_ELEMS = 1 << 19  # 512 Ki scalars: a [T, chunk] float64 buffer is 4 MiB per checkpoint


@dataclass(frozen=True, eq=False)
class GramSet:
    """Grams of drift rows per group.

    grams: group -> float64 array [T, T]; dims: group -> D (number of scalars in the group's pieces that were
    processed); tensor_names: the stored tensors that contributed, in processing order.
    """

    grams: dict[str, np.ndarray]
    dims: dict[str, int]
    tensor_names: tuple[str, ...] = field(default=())

    def __add__(self, other: GramSet) -> GramSet:
        return sum_grams([self, other])


def sum_grams(parts: Sequence[GramSet]) -> GramSet:
    """Sum partial Grams computed over disjoint tensor subsets (same groups, same rows)."""
    if not parts:
        raise ValueError("sum_grams needs at least one GramSet")
    keys = list(parts[0].grams)
    grams = {k: np.sum([p.grams[k] for p in parts], axis=0) for k in keys}
    dims = {k: int(sum(p.dims[k] for p in parts)) for k in keys}
    names: list[str] = []
    for p in parts:
        names.extend(p.tensor_names)
    return GramSet(grams=grams, dims=dims, tensor_names=tuple(names))


def tensor_names_of(groups: Mapping[str, Sequence[Any]]) -> list[str]:
    """Stored tensor names touched by ``groups``, in order of first appearance (deterministic)."""
    seen: dict[str, None] = {}
    for pieces in groups.values():
        for p in pieces:
            seen.setdefault(p.tensor, None)
    return list(seen)


def shard_tensor_names(names: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The subset of ``names`` that process ``rank`` of ``world_size`` handles (round robin)."""
    return list(names[rank::world_size])


def _unique_pieces(groups: Mapping[str, Sequence[Any]]) -> dict[str, list[tuple[Any, list[str]]]]:
    """tensor name -> [(piece, [groups containing it])]; equal pieces from different groups are merged."""
    out: dict[str, list[tuple[Any, list[str]]]] = {}
    for gname, pieces in groups.items():
        for p in pieces:
            lst = out.setdefault(p.tensor, [])
            for q, members in lst:
                if q is p or q == p:
                    if gname not in members:
                        members.append(gname)
                    break
            else:
                lst.append((p, [gname]))
    return out


def _as_source(item: Any) -> Any:
    """A Checkpoint (has ``tensors()``) or an already-open TensorSource."""
    return item.tensors() if hasattr(item, "tensors") and not hasattr(item, "get") else item


def _label(item: Any) -> str:
    step = getattr(item, "step", None)
    path = getattr(item, "path", None)
    return f"checkpoint {step} ({path})" if step is not None else str(path or item)


def _blocks(shape2d: tuple[int, int], chunk: int):
    """(r0, r1, c0, c1) tiles of a [R, C] matrix with at most ``chunk`` elements each, row-major order."""
    rows, cols = shape2d
    if cols <= chunk:
        step = max(1, chunk // max(cols, 1))
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step), 0, cols
    else:
        for r0 in range(rows):
            for c0 in range(0, cols, chunk):
                yield r0, r0 + 1, c0, min(cols, c0 + chunk)


def _as2d(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view [R, C] of a piece (1-D -> [1, n]); trailing dims are flattened (a copy only if not viewable)."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _read(src: Any, item: Any, name: str, device: torch.device) -> torch.Tensor:
    try:
        t = src.get(name)
    except KeyError as e:
        if isinstance(e, LayoutError):
            raise
        raise LayoutError(f"{_label(item)} has no tensor {name!r}", "every checkpoint of the run must hold the same tensors") from e
    if device.type != "cpu":
        t = t.to(device, non_blocking=True)
    return t


def drift_grams(
    checkpoints: Sequence[Any],
    anchor: Any,
    groups: Mapping[str, Sequence[Any]],
    device: str | torch.device = "cpu",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: Callable[[int], None] | None = None,
    tensor_names: Sequence[str] | None = None,
) -> GramSet:
    """Gram matrices G = X X^T of drift rows x(t) = theta(t) - theta(anchor), per group, in one streaming pass.

    checkpoints: the T rows (Checkpoint objects with ``tensors()``, or open TensorSources), in row order. If the
    anchor is among them its row is zero. anchor: a Checkpoint or TensorSource. groups: group name -> list of
    Pieces (``.tensor``, ``.take(t)``, ``.numel``). device: where chunks are multiplied (float64).
    chunk_elems: scalars per row of the [T, chunk] buffer; any value gives the same Gram up to rounding order.
    progress: called with 1 after each stored tensor is done. tensor_names: restrict to these stored tensors
    (partial Gram; subsets sum with :func:`sum_grams`).

    Returns a GramSet: grams[group] float64 numpy [T, T]; dims[group] = scalars of that group processed.
    """
    dev = torch.device(device)
    chunk = max(1, int(chunk_elems))
    by_tensor = _unique_pieces(groups)
    names = tensor_names_of(groups) if tensor_names is None else [n for n in tensor_names if n in by_tensor]
    T = len(checkpoints)
    acc = {g: torch.zeros(T, T, dtype=torch.float64, device=dev) for g in groups}
    dims = dict.fromkeys(groups, 0)
    if T == 0:
        return GramSet({g: np.zeros((0, 0)) for g in groups}, dims, tuple(names))
    buf = torch.empty(T, min(chunk, max((p.numel for n in names for p, _ in by_tensor[n]), default=1)),
                      dtype=torch.float64, device=dev)
    with ExitStack() as stack:
        anchor_src = _as_source(anchor)
        stack.callback(anchor_src.close)
        srcs = []
        for c in checkpoints:
            s = _as_source(c)
            stack.callback(s.close)
            srcs.append(s)
        shape_ref = {n: tuple(anchor_src.shape(n)) for n in names}
        for name in names:
            base = _read(anchor_src, anchor, name, dev)
            rows = []
            for c, s in zip(checkpoints, srcs, strict=True):
                if tuple(s.shape(name)) != shape_ref[name]:
                    raise LayoutError(
                        f"{_label(c)}: tensor {name!r} has shape {tuple(s.shape(name))}, the anchor has {shape_ref[name]}",
                        "all checkpoints of one run must have the same architecture",
                    )
                rows.append(_read(s, c, name, dev))  # held in the stored dtype until this tensor is done
            for piece, members in by_tensor[name]:
                gp = piece_gram([piece.take(r) for r in rows], piece.take(base), buf)
                for g in members:
                    acc[g] += gp
                    dims[g] += int(piece.numel)
            del rows, base
            if progress is not None:
                progress(1)
    return GramSet({g: a.cpu().numpy() for g, a in acc.items()}, dims, tuple(names))


def piece_gram(views: Sequence[torch.Tensor], anchor_view: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Gram [T, T] (float64) of the drift of one piece: rows ``views[i] - anchor_view``, flattened.

    views: T tensors of the piece's shape (any dtype, any strides); buf: float64 scratch [T, >= 1] on the
    compute device. The piece is walked in tiles of at most ``buf.shape[1]`` scalars.
    """
    T = len(views)
    chunk = buf.shape[1]
    g = torch.zeros(T, T, dtype=torch.float64, device=buf.device)
    v2 = [_as2d(v) for v in views]
    a2 = _as2d(anchor_view)
    on_cpu = buf.device.type == "cpu"
    if on_cpu:
        # numpy's strided convert-and-subtract is an order of magnitude faster than torch's CPU copy kernels for
        # these [h, w] tiles; numpy has no bfloat16, so those pieces go through float32 (exact) first.
        v2 = [_np(v) for v in v2]
        a2 = _np(a2)
        bn = buf.numpy()
    for r0, r1, c0, c1 in _blocks(tuple(a2.shape), chunk):
        h, w = r1 - r0, c1 - c0
        m = h * w
        tile = buf[:, :m]
        if on_cpu:
            a = a2[r0:r1, c0:c1]
            for i in range(T):
                np.subtract(v2[i][r0:r1, c0:c1], a, out=bn[i, :m].reshape(h, w), dtype=np.float64)
        else:
            a = a2[r0:r1, c0:c1].to(dtype=torch.float64).reshape(1, m)
            for i in range(T):
                tile[i].view(h, w).copy_(v2[i][r0:r1, c0:c1])
            tile.sub_(a)  # exact in float64 for fp32/bf16/fp16 inputs
        g.addmm_(tile, tile.T)
    return g


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bf16 converted to float32, which is exact)."""
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.numpy()


# ---------------------------------------------------------------------------------------------------------------
# Streaming safetensors writer (for singular vectors that must never be held whole in memory)

_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor, in a fixed order declared up front.

    ``specs`` maps name -> (shape, dtype); tensors must then be written with :meth:`write` in exactly that order.
    The header is written first (its offsets follow from the shapes), so at most one tensor is in memory.
    """

    def __init__(self, path: Path | str, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._order = list(specs)
        self._specs = dict(specs)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        for name in self._order:
            shape, dtype = self._specs[name]
            n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append tensor ``name`` (must be the next in the declared order, with the declared shape)."""
        expect = self._order[self._next]
        shape, dtype = self._specs[expect]
        if name != expect or tuple(t.shape) != tuple(shape):
            raise ValueError(f"expected {expect} {shape}, got {name} {tuple(t.shape)}")
        data = t.detach().to("cpu", dtype).contiguous()
        self._f.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> Path:
        """Finish the file (all declared tensors must have been written); returns its path."""
        self._f.close()
        if self._next != len(self._order):
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        self._tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)
