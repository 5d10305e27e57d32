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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.errors import LayoutError, NonFiniteWeightsError
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


def _label(item: Any) -> str:
    step = getattr(item, "step", None)
    path = getattr(item, "path", None)
    return f"checkpoint {step} ({path})" if step is not None else str(path or item)






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


# ---------------------------------------------------------------------------------------------------------------
# Chunked streaming pass


@dataclass
class _TensorPlan:
    name: str
    shape: tuple[int, ...]
    numel: int
    pieces: list[int]  # canonical piece ids of this tensor's pieces
    objs: list[Any]  # the Piece objects, same order


def _label_layers(tp: _TensorPlan) -> list[np.ndarray]:
    """Flat int16 label arrays (local piece index, -1 = none), one per layer of non-overlapping pieces; [] when
    the tensor is one whole piece."""
    if len(tp.objs) == 1 and getattr(tp.objs[0], "whole", False):
        return []
    if len(tp.objs) > np.iinfo(np.int16).max:
        raise ValueError(f"{tp.name}: more than {np.iinfo(np.int16).max} pieces in one tensor")
    layers: list[torch.Tensor] = []
    for j, piece in enumerate(tp.objs):
        for lab in layers:
            region = piece.take(lab)
            if bool((region == -1).all()):
                region.fill_(j)
                break
        else:
            lab = torch.full(tp.shape, -1, dtype=torch.int16)
            piece.take(lab).fill_(j)
            layers.append(lab)
    return [lab.reshape(-1).numpy() for lab in layers]


def _chunk_plan(tp: _TensorPlan, layers: list[np.ndarray], a: int, b: int) -> list[tuple[int, slice | np.ndarray]]:
    """(piece id, columns of D) for every piece present in elements [a, b) of the flattened tensor."""
    n = b - a
    if not layers:
        return [(tp.pieces[0], slice(0, n))]
    out: list[tuple[int, slice | np.ndarray]] = []
    for lab in layers:
        seg = lab[a:b]
        change = np.flatnonzero(seg[1:] != seg[:-1]) + 1
        if change.size == 0:
            if seg[0] >= 0:
                out.append((tp.pieces[int(seg[0])], slice(0, n)))
            continue
        starts = np.concatenate(([0], change))
        ends = np.concatenate((change, [n]))
        vals = seg[starts]
        for j in np.unique(vals):
            if j < 0:
                continue
            runs = np.flatnonzero(vals == j)
            if runs.size == 1:
                out.append((tp.pieces[int(j)], slice(int(starts[runs[0]]), int(ends[runs[0]]))))
            else:
                out.append((tp.pieces[int(j)], np.flatnonzero(seg == j)))
    return out


def _sub_into(raw: torch.Tensor, base: np.ndarray | None, out: np.ndarray) -> None:
    """out = float64(raw) - base (base None: out = float64(raw)). Exact for float inputs up to 53-bit mantissas."""
    if raw.dtype in (torch.float32, torch.float64, torch.float16) or not raw.is_floating_point():
        try:
            src = raw.numpy()
        except TypeError:
            src = None
        if src is not None:
            if base is None:
                np.copyto(out, src, casting="unsafe")
            else:
                np.subtract(src, base, out=out, dtype=np.float64, casting="unsafe")
            return
    torch.from_numpy(out).copy_(raw)  # bf16, fp8: exact upcast through torch
    if base is not None:
        np.subtract(out, base, out=out)


class _Slot:
    """One of two buffer sets: raw stored-dtype bytes per source and, on the CPU path, the float64 drift D."""

    def __init__(self, n_src: int, chunk: int, max_item: int, T: int, numpy_path: bool, pin: bool):
        self.raw = [torch.empty(chunk * max_item, dtype=torch.uint8, pin_memory=pin) for _ in range(n_src)]
        self.flat = np.empty(T * chunk, dtype=np.float64) if numpy_path else None
        self.base = np.empty(chunk, dtype=np.float64) if numpy_path else None


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
    backend = _backend or ("numpy" if dev.type == "cpu" else "torch")
    numpy_path = backend == "numpy"
    chunk = max(1, int(chunk_elems))
    by_tensor = _unique_pieces(groups)
    all_names = tensor_names_of(groups)
    wanted = set(all_names if tensor_names is None else tensor_names)
    names = [n for n in all_names if n in wanted] if tensor_names is None else [n for n in tensor_names if n in by_tensor]
    # canonical piece order over all groups (independent of tensor_names, so partial results line up)
    pid_of: dict[tuple[str, int], int] = {}
    members: list[tuple[str, ...]] = []
    numels: list[int] = []
    for n in all_names:
        for j, (piece, mem) in enumerate(by_tensor[n]):
            pid_of[(n, j)] = len(members)
            members.append(tuple(mem))
            numels.append(int(piece.numel))
    T = len(checkpoints)
    P = len(members)
    done = np.zeros(P, dtype=bool)
    if progress_total is not None:
        progress_total(float(len(names) * (T + 1)))
    if T == 0:
        pg = PieceGrams(np.zeros((P, 0, 0)), done, tuple(members), tuple(numels), tuple(groups))
        for n in names:
            for j in range(len(by_tensor[n])):
                done[pid_of[(n, j)]] = True
        return pg.combine(names)
    if numpy_path:
        acc: Any = np.zeros((P, T, T), dtype=np.float64)
    else:
        acc = torch.zeros(P, T, T, dtype=torch.float64, device=dev)

    with ExitStack() as stack:
        anchor_src = _as_source(anchor)
        stack.callback(anchor_src.close)
        srcs = [anchor_src]
        items = [anchor, *checkpoints]
        for c in checkpoints:
            s = _as_source(c)
            stack.callback(s.close)
            srcs.append(s)
        plans: list[_TensorPlan] = []
        dtypes: list[list[torch.dtype]] = []  # [tensor][source]
        for name in names:
            shape = _shape_of(anchor_src, anchor, name)
            for c, s in zip(checkpoints, srcs[1:], strict=True):
                sh = _shape_of(s, c, name)
                if sh != shape:
                    raise LayoutError(
                        f"{_label(c)}: tensor {name!r} has shape {sh}, the anchor has {shape}",
                        "all checkpoints of one run must have the same architecture",
                    )
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            plans.append(_TensorPlan(name, shape, numel, [pid_of[(name, j)] for j in range(len(by_tensor[name]))],
                                     [p for p, _ in by_tensor[name]]))
            dtypes.append([s.dtype(name) for s in srcs])
            for pid in plans[-1].pieces:
                done[pid] = True
        jobs = [(ti, a, min(a + chunk, tp.numel)) for ti, tp in enumerate(plans) for a in range(0, tp.numel, chunk)]
        zero_units = sum(T + 1 for tp in plans if tp.numel == 0)
        if progress is not None and zero_units:
            progress(float(zero_units))
        if jobs:
            width = min(chunk, max(tp.numel for tp in plans))
            max_item = max(torch.empty((), dtype=d).element_size() for ds in dtypes for d in ds)
            pin = dev.type == "cuda" and torch.cuda.is_available()
            workers = _compute_threads(threads) if numpy_path else 1
            n_slots = workers + 1 if prefetch else 1
            slots = [_Slot(T + 1, width, max_item, T, numpy_path, pin) for _ in range(n_slots)]
            dbufs = [] if numpy_path else [torch.empty(T * width, dtype=torch.float64, device=dev)
                                           for _ in range(workers)]
            label_state: dict[str, Any] = {"ti": -1, "layers": []}

            def fill(k: int):
                """Read chunk k of every source into its slot; on the CPU path also form D = rows - anchor."""
                ti, a, b = jobs[k]
                tp, slot, n = plans[ti], slots[k % n_slots], b - a
                raws = []
                for i, s in enumerate(srcs):
                    dt = dtypes[ti][i]
                    out = slot.raw[i][: n * torch.empty((), dtype=dt).element_size()].view(dt)
                    try:
                        raws.append(s.read_flat(tp.name, a, b, out=out))
                    except KeyError as e:
                        if isinstance(e, LayoutError):
                            raise
                        raise LayoutError(f"{_label(items[i])} has no tensor {tp.name!r}",
                                          "every checkpoint of the run must hold the same tensors") from e
                    if raws[-1].is_floating_point() and not bool(torch.isfinite(raws[-1]).all()):
                        raise NonFiniteWeightsError(
                            f"{_label(items[i])}: tensor {tp.name!r} holds NaN or infinite values (a diverged "
                            "run?), so the drift geometry is undefined",
                            "leave the checkpoints from the divergence on out (--steps), or audit an earlier part of the run",
                        )
                if label_state["ti"] != ti:
                    label_state["ti"], label_state["layers"] = ti, []  # release the previous tensor's labels first
                    label_state["layers"] = _label_layers(tp)
                plan = _chunk_plan(tp, label_state["layers"], a, b)
                if not numpy_path:
                    return plan, raws, None
                base = slot.base[:n]
                _sub_into(raws[0], None, base)
                D = slot.flat[: T * n].reshape(T, n)
                for i in range(T):
                    _sub_into(raws[i + 1], base, D[i])
                return plan, raws, D

            def product(k: int, filled: Any) -> list[tuple[int, Any]]:
                """The T x T products of chunk k, one per piece present (added to the Grams in job order)."""
                plan, raws, D = filled.result() if hasattr(filled, "result") else filled
                out: list[tuple[int, Any]] = []
                if numpy_path:
                    for pid, sel in plan:
                        Dp = D[:, sel]
                        out.append((pid, Dp @ Dp.T))  # A @ A.T of one unit-stride buffer: BLAS dsyrk
                    return out
                n = jobs[k][2] - jobs[k][1]
                Dg = dbufs[k % workers][: T * n].view(T, n)
                base = raws[0].to(dev, non_blocking=True).to(torch.float64)
                for i in range(T):
                    Dg[i].copy_(raws[i + 1].to(dev, non_blocking=True))
                Dg.sub_(base)  # exact in float64 for fp32/bf16/fp16 inputs
                for pid, sel in plan:
                    Dp = Dg[:, sel] if isinstance(sel, slice) else Dg.index_select(1, torch.as_tensor(sel, device=dev))
                    out.append((pid, Dp @ Dp.T))
                if dev.type == "cuda":
                    torch.cuda.current_stream(dev).synchronize()  # the reader reuses the pinned slot buffers
                return out

            if numpy_path:
                stack.enter_context(_single_threaded_blas())
            if prefetch:
                reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="ckptaudit-read"))
                pool = stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="ckptaudit-gram"))
                prods = {}
                for k in range(min(n_slots, len(jobs))):
                    prods[k] = pool.submit(product, k, reader.submit(fill, k))
            for k in range(len(jobs)):
                if prefetch:
                    res = prods.pop(k).result()
                    nxt = k + n_slots
                    if nxt < len(jobs):  # slot of job k is free again
                        prods[nxt] = pool.submit(product, nxt, reader.submit(fill, nxt))
                else:
                    res = product(k, fill(k))
                for pid, g in res:  # always in job order: the sums do not depend on the number of threads
                    acc[pid] += g
                if progress is not None:
                    ti, a, b = jobs[k]
                    progress((T + 1) * (b - a) / plans[ti].numel)
    if not numpy_path:
        acc = acc.cpu().numpy()
        acc = 0.5 * (acc + acc.transpose(0, 2, 1))
    pg = PieceGrams(acc, done, tuple(members), tuple(numels), tuple(groups))
    return pg.combine(names)


def _compute_threads(threads: int | None) -> int:
    if threads is not None:
        return max(1, int(threads))
    return max(1, min(8, torch.get_num_threads()))


class _single_threaded_blas:
    """Limit numpy's BLAS to one thread for the duration of the pass (restored afterwards).

    OpenBLAS's own threading of dsyrk with a small output (T x T) and a long inner dimension is pathologically
    slow (measured 30x slower than one thread on two cores), so the engine runs one single-threaded product per
    worker thread instead. Uses threadpoolctl when installed, else OpenBLAS's ``*_set_num_threads`` through
    ctypes; without either it does nothing.
    """

    def __enter__(self) -> _single_threaded_blas:
        self._restore: Callable[[], None] | None = None
        try:
            from threadpoolctl import threadpool_limits

            lim = threadpool_limits(limits=1, user_api="blas")
            self._restore = lim.restore_original_limits
            return self
        except Exception:  # noqa: BLE001 - optional dependency; fall back to ctypes
            pass
        try:
            fns = _openblas_thread_fns()
            if fns is not None:
                get, set_ = fns
                before = int(get())
                set_(1)
                self._restore = lambda: set_(before)
        except Exception:  # noqa: BLE001 - best effort only
            self._restore = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._restore is not None:
            self._restore()


def _openblas_thread_fns() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the thread count of the OpenBLAS that numpy loaded, found in /proc/self/maps."""
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    libs = sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.rsplit("/", 1)[-1].lower()})
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    return get, set_
    return None


def _shape_of(src: Any, item: Any, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in src.shape(name))
    except KeyError as e:
        if isinstance(e, LayoutError):
            raise
        raise LayoutError(f"{_label(item)} has no tensor {name!r}", "every checkpoint of the run must hold the same tensors") from e




