"""Streaming Gram engine: the T x T Gram matrix of drift rows, in chunks of every stored tensor.

Drift row of checkpoint t restricted to a group of pieces: x(t) = theta(t) - theta(anchor) over those pieces,
flattened. The engine returns G = X X^T (float64, shape [T, T], units: squared parameter units) for every group
without ever forming X. For each stored tensor name (outer loop) it walks the row-major flattened tensor in
chunks of ``chunk_elems`` elements; for each chunk it reads those elements from the anchor and from each of the
T checkpoints (``TensorSource.read_flat``: positioned reads, no memory map, sources opened once for the pass),
subtracts the anchor in float64 (exact for fp32/bf16/fp16 inputs) into a [T, chunk] buffer D, and accumulates
the symmetric rank-k update ``G_piece += D_p D_p^T`` for every piece p present in the chunk.

Pieces inside a chunk: an int16 label tensor of the stored tensor's shape holds, for every element, the piece
it belongs to (-1: none; written with ``piece.take(labels).fill_(id)``, so any view/index a Piece can describe is
supported). The chunk's slice of the labels is run-length encoded: a piece that covers the whole chunk uses D
itself, a piece that is one contiguous run uses a column view of D, others gather their columns. A tensor that is
a single whole piece (the usual case for LLaMA-style separate projections) needs no labels. Overlapping pieces
go to separate label layers.

Speed: on the CPU the products are numpy ``D @ D.T`` with a C-contiguous (or unit-stride) D, which numpy sends
to BLAS ``dsyrk`` (half the flops of a general GEMM; about 2 T^2 D / 2 flops in all, float64). A background
reader thread prefetches and converts the next chunk while BLAS works on the current one (file reads and numpy
conversions release the GIL). On CUDA the chunks are read into pinned host buffers, copied to the GPU and
multiplied there in float64 (``torch.addmm``).

Memory: two [T, chunk] float64 buffers (double buffering), one (T + 1) x chunk buffer of stored-dtype bytes,
the label tensor of the current tensor (int16, only when it is split into several pieces), and the T x T Gram
of every piece. It does not grow with model size or tensor size beyond that (formats without ranged reads —
pickles, GGUF, DCP — hold one whole tensor per checkpoint; see ``TensorSource.ranged_reads``).

Partial Grams add: ``drift_grams(..., tensor_names=subset)`` over disjoint subsets sum to the full Gram
(:func:`sum_grams`), which is how the work splits across processes (:mod:`ckptaudit.analyses.distributed`:
per-piece Grams are all-reduced, then summed into groups in one fixed order, so a distributed run reproduces
the single-process Grams exactly; :func:`balanced_shards` gives each rank a size-balanced subset).

Structure: :class:`_PieceLayout` fixes the canonical piece order, :class:`GramAccumulator` holds the per-piece
partial Grams of a pass, :func:`_plan_tensors` checks shapes and plans each tensor, and :func:`_stream` runs the
chunks (read, drift rows, products: :mod:`.chunks`) into the accumulator in job order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptaudit.analyses.backbone.chunks import (
    _ChunkReader,
    _compute_threads,
    _DeviceProducts,
    _in_job_order,
    _itemsize,
    _label,
    _missing_tensor,
    _numpy_products,
    _PassOptions,
    _single_threaded_blas,
    _Slot,
    _TensorPlan,
)
from ckptaudit.errors import LayoutError
from ckptaudit.io.source import TensorSource
from ckptaudit.io.types import CheckpointLike

DEFAULT_CHUNK_ELEMS = 1 << 17  # 128 Ki scalars: a [T, chunk] float64 buffer is 1 MiB per checkpoint


@dataclass(frozen=True, eq=False)
class PieceGrams:
    """Per-piece Grams behind a GramSet, in the canonical piece order of the groups (tensor names in order of
    first appearance, then the pieces of each tensor).

    grams: float64 [P, T, T] (zero for pieces not processed); done: bool [P]; members: the groups holding each
    piece; numel: scalars per piece; group_names: every group, in order.
    """

    grams: np.ndarray
    done: np.ndarray
    members: tuple[tuple[str, ...], ...]
    numel: tuple[int, ...]
    group_names: tuple[str, ...]

    def combine(self, tensor_names: Sequence[str] = ()) -> GramSet:
        """Group Grams as sums of their processed pieces, always added in the canonical order."""
        T = self.grams.shape[1] if self.grams.ndim == 3 else 0
        grams = {g: np.zeros((T, T), dtype=np.float64) for g in self.group_names}
        dims = dict.fromkeys(self.group_names, 0)
        for i, members in enumerate(self.members):
            if not self.done[i]:
                continue
            for g in members:
                grams[g] += self.grams[i]
                dims[g] += int(self.numel[i])
        return GramSet(grams, dims, tuple(tensor_names), pieces=self)


@dataclass(frozen=True, eq=False)
class GramSet:
    """Grams of drift rows per group.

    grams: group -> float64 array [T, T]; dims: group -> D (number of scalars in the group's pieces that were
    processed); tensor_names: the stored tensors that contributed, in processing order; pieces: the per-piece
    Grams they were summed from (None when built by hand or by :func:`sum_grams`).
    """

    grams: dict[str, np.ndarray]
    dims: dict[str, int]
    tensor_names: tuple[str, ...] = field(default=())
    pieces: PieceGrams | None = field(default=None, repr=False)

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


def balanced_shards(names: Sequence[str], sizes: Mapping[str, int], world_size: int) -> list[list[str]]:
    """Split ``names`` into ``world_size`` disjoint subsets of nearly equal total size (greedy: largest tensor
    first, each to the least-loaded rank; ties to the lowest rank). Deterministic, so every rank computes the same
    split. Each subset keeps the order of ``names``."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    load = [0] * world_size
    owner: dict[str, int] = {}
    for i in sorted(range(len(names)), key=lambda i: (-int(sizes[names[i]]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[names[i]] = r
        load[r] += int(sizes[names[i]])
    return [[n for n in names if owner[n] == r] for r in range(world_size)]


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


def _as_source(item: CheckpointLike | TensorSource) -> TensorSource:
    """A Checkpoint's tensors, or an already-open TensorSource."""
    return item if isinstance(item, TensorSource) else item.tensors()


def _read(src: Any, item: Any, name: str, device: torch.device) -> torch.Tensor:
    try:
        t = src.get(name)
    except KeyError as e:
        if isinstance(e, LayoutError):
            raise
        raise _missing_tensor(item, name) from e
    if device.type != "cpu":
        t = t.to(device, non_blocking=True)
    return t


# ---------------------------------------------------------------------------------------------------------------
# Chunked streaming pass


@dataclass(frozen=True)
class _PieceLayout:
    """The canonical piece order over all groups: tensor names in order of first appearance, then the pieces of
    each tensor. It does not depend on ``tensor_names``, so partial results of disjoint subsets line up.

    by_tensor: tensor name -> [(piece, groups holding it)]; names: the stored tensors, in order; first: tensor
    name -> canonical id of its first piece (a tensor's pieces have consecutive ids); members, numel: per piece,
    the groups holding it and its number of scalars; group_names: every group, in order.
    """

    by_tensor: dict[str, list[tuple[Any, list[str]]]]
    names: list[str]
    first: dict[str, int]
    members: tuple[tuple[str, ...], ...]
    numel: tuple[int, ...]
    group_names: tuple[str, ...]

    @classmethod
    def of(cls, groups: Mapping[str, Sequence[Any]]) -> _PieceLayout:
        by_tensor = _unique_pieces(groups)
        names = tensor_names_of(groups)
        first: dict[str, int] = {}
        members: list[tuple[str, ...]] = []
        numel: list[int] = []
        for n in names:
            first[n] = len(members)
            for piece, mem in by_tensor[n]:
                members.append(tuple(mem))
                numel.append(int(piece.numel))
        return cls(by_tensor, names, first, tuple(members), tuple(numel), tuple(groups))

    def piece_ids(self, name: str) -> list[int]:
        """Canonical ids of the pieces of stored tensor ``name``, in order."""
        return list(range(self.first[name], self.first[name] + len(self.by_tensor[name])))

    def select(self, tensor_names: Sequence[str] | None) -> list[str]:
        """The tensors a pass processes: all (None), else those of ``tensor_names`` that the groups touch."""
        if tensor_names is None:
            return list(self.names)
        return [n for n in tensor_names if n in self.by_tensor]


class GramAccumulator:
    """The per-piece partial Grams of one pass and which pieces were processed.

    grams: float64 [P, T, T] in the layout's canonical piece order (numpy on the CPU path, a torch tensor on
    ``device`` otherwise; [P, 0, 0] numpy when T = 0); done: bool [P]. Products are added with :meth:`add` in
    chunk order, so the sums do not depend on how many threads computed them.
    """

    def __init__(self, layout: _PieceLayout, T: int, device: torch.device, numpy_path: bool):
        self.layout = layout
        P = len(layout.members)
        self.done = np.zeros(P, dtype=bool)
        self.grams: Any
        if T == 0 or numpy_path:
            self.grams = np.zeros((P, T, T), dtype=np.float64)
        else:
            self.grams = torch.zeros(P, T, T, dtype=torch.float64, device=device)

    def mark_done(self, name: str) -> None:
        """Count the pieces of stored tensor ``name`` as processed."""
        self.done[self.layout.piece_ids(name)] = True

    def add(self, products: Sequence[tuple[int, Any]]) -> None:
        """Add (piece id, T x T product) pairs, in the order given."""
        for pid, g in products:
            self.grams[pid] += g

    def result(self, names: Sequence[str]) -> GramSet:
        """The GramSet of the pass over ``names`` (device Grams are copied back and symmetrised)."""
        acc = self.grams
        if isinstance(acc, torch.Tensor):
            acc = acc.cpu().numpy()
            acc = 0.5 * (acc + acc.transpose(0, 2, 1))
        lay = self.layout
        return PieceGrams(acc, self.done, lay.members, lay.numel, lay.group_names).combine(names)


def _common_shape(name: str, srcs: Sequence[TensorSource], items: Sequence[Any]) -> tuple[int, ...]:
    """The shape of tensor ``name``, the same in every source (anchor first), else a LayoutError."""
    shape = _shape_of(srcs[0], items[0], name)
    for s, item in zip(srcs[1:], items[1:], strict=True):
        sh = _shape_of(s, item, name)
        if sh != shape:
            raise LayoutError(
                f"{_label(item)}: tensor {name!r} has shape {sh}, the anchor has {shape}",
                "all checkpoints of one run must have the same architecture",
            )
    return shape


def _plan_tensors(layout: _PieceLayout, names: Sequence[str], srcs: Sequence[TensorSource], items: Sequence[Any],
                  acc: GramAccumulator) -> list[_TensorPlan]:
    """One plan per tensor of the pass (shapes checked against the anchor); marks its pieces processed."""
    plans = []
    for name in names:
        shape = _common_shape(name, srcs, items)
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        objs = [p for p, _ in layout.by_tensor[name]]
        plans.append(_TensorPlan(name, shape, numel, layout.piece_ids(name), objs, [s.dtype(name) for s in srcs]))
        acc.mark_done(name)
    return plans


def _stream(stack: ExitStack, acc: GramAccumulator, srcs: Sequence[TensorSource], items: Sequence[Any],
            plans: Sequence[_TensorPlan], opts: _PassOptions, progress: Callable[[float], None] | None) -> None:
    """Run the chunked pass over ``plans`` into ``acc``, reporting progress after every chunk."""
    T = len(srcs) - 1
    jobs = [(ti, a, min(a + opts.chunk, tp.numel)) for ti, tp in enumerate(plans) for a in range(0, tp.numel, opts.chunk)]
    zero_units = sum(T + 1 for tp in plans if tp.numel == 0)
    if progress is not None and zero_units:
        progress(float(zero_units))
    if not jobs:
        return
    width = min(opts.chunk, max(tp.numel for tp in plans))
    max_item = max(_itemsize(d) for tp in plans for d in tp.dtypes)
    pin = opts.device.type == "cuda" and torch.cuda.is_available()
    slots = [_Slot(T + 1, width, max_item, T, opts.numpy_path, pin) for _ in range(opts.n_slots)]
    fill = _ChunkReader(srcs, items, plans, jobs, slots, opts.numpy_path)
    product = _numpy_products if opts.numpy_path else _DeviceProducts(opts.device, T, width, opts.workers, jobs)
    if opts.numpy_path:
        stack.enter_context(_single_threaded_blas())
    for k, res in _in_job_order(stack, len(jobs), fill, product, opts):
        acc.add(res)  # always in job order: the sums do not depend on the number of threads
        if progress is not None:
            ti, a, b = jobs[k]
            progress((T + 1) * (b - a) / plans[ti].numel)


def _open_sources(stack: ExitStack, items: Sequence[CheckpointLike | TensorSource]) -> list[TensorSource]:
    """Open every item's tensors once for the pass (closed when ``stack`` exits)."""
    srcs = []
    for item in items:
        s = _as_source(item)
        stack.callback(s.close)
        srcs.append(s)
    return srcs


def drift_grams(
    checkpoints: Sequence[CheckpointLike | TensorSource],
    anchor: CheckpointLike | TensorSource,
    groups: Mapping[str, Sequence[Any]],
    device: str | torch.device = "cpu",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: Callable[[float], None] | None = None,
    tensor_names: Sequence[str] | None = None,
    progress_total: Callable[[float], None] | None = None,
    prefetch: bool = True,
    threads: int | None = None,
    _backend: str | None = None,
) -> GramSet:
    """Gram matrices G = X X^T of drift rows x(t) = theta(t) - theta(anchor), per group, in one streaming pass.

    checkpoints: the T rows (Checkpoint objects with ``tensors()``, or open TensorSources), in row order. If the
    anchor is among them its row is zero. anchor: a Checkpoint or TensorSource. groups: group name -> list of
    Pieces (``.tensor``, ``.take(t)``, ``.numel``; ``.whole`` optional). device: where chunks are multiplied
    (float64; "cpu" uses numpy/BLAS syrk, anything else torch on that device). chunk_elems: flat elements per
    chunk; any value gives the same Gram up to rounding order. tensor_names: restrict to these stored tensors
    (partial Gram; subsets sum with :func:`sum_grams`). prefetch: read ahead in a background thread while the
products run. threads: CPU threads for the products (default ``torch.get_num_threads()``, at most 8; BLAS itself
runs single-threaded inside the pass, see :func:`_single_threaded_blas`); results do not depend on it.

    Progress contract: the unit is one stored tensor of one checkpoint (the anchor counts), so a full pass is
    ``len(tensor names) x (T + 1)`` units. ``progress_total(units)`` is called once before the pass (when given);
    ``progress(u)`` is called after every chunk with its (fractional) share, summing to that total.

    Returns a GramSet: grams[group] float64 numpy [T, T]; dims[group] = scalars of that group processed; pieces
    = the per-piece Grams (for exact distributed reduction).
    """
    dev = torch.device(device)
    numpy_path = (_backend or ("numpy" if dev.type == "cpu" else "torch")) == "numpy"
    layout = _PieceLayout.of(groups)
    names = layout.select(tensor_names)
    T = len(checkpoints)
    if progress_total is not None:
        progress_total(float(len(names) * (T + 1)))
    acc = GramAccumulator(layout, T, dev, numpy_path)
    if T == 0:
        for n in names:
            acc.mark_done(n)
        return acc.result(names)
    opts = _PassOptions(dev, numpy_path, max(1, int(chunk_elems)), prefetch,
                        _compute_threads(threads) if numpy_path else 1)
    items = [anchor, *checkpoints]
    with ExitStack() as stack:
        srcs = _open_sources(stack, items)
        plans = _plan_tensors(layout, names, srcs, items, acc)
        _stream(stack, acc, srcs, items, plans, opts, progress)
    return acc.result(names)


def _shape_of(src: Any, item: Any, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in src.shape(name))
    except KeyError as e:
        if isinstance(e, LayoutError):
            raise
        raise _missing_tensor(item, name) from e


