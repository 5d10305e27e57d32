"""One chunk of the streaming Gram pass of :mod:`.gram`: reading it, forming the drift rows, the products.

A pass is a list of jobs, (tensor index, start, end) in flat elements of one stored tensor. :class:`_ChunkReader`
reads job k from the anchor and the T checkpoints into buffer set (slot) ``k % n_slots`` and, on the CPU path,
forms D = rows - anchor in float64 there; the piece labels of the current tensor (:func:`_label_layers`) give,
through :func:`_chunk_plan`, the columns of D of every piece present. :func:`_numpy_products` (BLAS dsyrk, one
single-threaded product per worker, see :class:`_single_threaded_blas`) or :class:`_DeviceProducts` (torch on the
device) turn a chunk into one T x T product per piece; :func:`_in_job_order` runs reads and products in threads
and hands the products back in job order, so the sums do not depend on the number of threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.errors import LayoutError, NonFiniteWeightsError
from ckptaudit.io.source import TensorSource


def _label(item: Any) -> str:
    step = getattr(item, "step", None)
    path = getattr(item, "path", None)
    return f"checkpoint {step} ({path})" if step is not None else str(path or item)


@dataclass
class _TensorPlan:
    name: str
    shape: tuple[int, ...]
    numel: int
    pieces: list[int]  # canonical piece ids of this tensor's pieces
    objs: list[Any]  # the Piece objects, same order
    dtypes: list[torch.dtype]  # stored dtype in every source (anchor first)


def _missing_tensor(item: Any, name: str) -> LayoutError:
    return LayoutError(f"{_label(item)} has no tensor {name!r}", "every checkpoint of the run must hold the same tensors")


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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_finite(raw: torch.Tensor, item: Any, name: str) -> None:
    if raw.is_floating_point() and not bool(torch.isfinite(raw).all()):
        raise NonFiniteWeightsError(
            f"{_label(item)}: tensor {name!r} holds NaN or infinite values (a diverged run?), so the drift geometry "
            "is undefined",
            "leave the checkpoints from the divergence on out ($steps), or audit an earlier part of the run",
            param="steps",
        )


def _drift_rows(raws: Sequence[torch.Tensor], slot: _Slot, T: int, n: int) -> np.ndarray:
    """D = rows - anchor, float64 [T, n], in the slot's buffer (raws: anchor first, then the T rows)."""
    base = slot.base[:n]
    _sub_into(raws[0], None, base)
    D = slot.flat[: T * n].reshape(T, n)
    for i in range(T):
        _sub_into(raws[i + 1], base, D[i])
    return D


# A filled chunk: (piece id, columns) per piece present, the raw stored-dtype reads (anchor first), and on the
# CPU path the float64 drift D [T, n] (None on the device path, which forms D there).
_Chunk = tuple[list[tuple[int, "slice | np.ndarray"]], list[torch.Tensor], "np.ndarray | None"]


class _ChunkReader:
    """Reads chunk k of the pass (``jobs[k]`` = (tensor index, start, end)) from every source into slot
    ``k % len(slots)``. Keeps the label layers of the tensor being read (one tensor at a time: the previous
    tensor's labels are released before the next ones are built). Called from one reader thread at a time.
    """

    def __init__(self, srcs: Sequence[TensorSource], items: Sequence[Any], plans: Sequence[_TensorPlan],
                 jobs: Sequence[tuple[int, int, int]], slots: Sequence[_Slot], numpy_path: bool):
        self.srcs, self.items, self.plans, self.jobs, self.slots = srcs, items, plans, jobs, slots
        self.T = len(srcs) - 1
        self.numpy_path = numpy_path
        self._labels_of = -1  # index of the tensor whose label layers are held
        self._layers: list[np.ndarray] = []

    def __call__(self, k: int) -> _Chunk:
        ti, a, b = self.jobs[k]
        tp, slot = self.plans[ti], self.slots[k % len(self.slots)]
        raws = [self._read(i, tp, a, b, slot) for i in range(len(self.srcs))]
        plan = _chunk_plan(tp, self._layers_for(ti), a, b)
        D = _drift_rows(raws, slot, self.T, b - a) if self.numpy_path else None
        return plan, raws, D

    def _read(self, i: int, tp: _TensorPlan, a: int, b: int, slot: _Slot) -> torch.Tensor:
        """Elements [a, b) of tensor ``tp`` from source i, into the slot's raw buffer i."""
        dt = tp.dtypes[i]
        out = slot.raw[i][: (b - a) * _itemsize(dt)].view(dt)
        try:
            raw = self.srcs[i].read_flat(tp.name, a, b, out=out)
        except KeyError as e:
            if isinstance(e, LayoutError):
                raise
            raise _missing_tensor(self.items[i], tp.name) from e
        _check_finite(raw, self.items[i], tp.name)
        return raw

    def _layers_for(self, ti: int) -> list[np.ndarray]:
        if self._labels_of != ti:
            self._labels_of, self._layers = ti, []  # release the previous tensor's labels first
            self._layers = _label_layers(self.plans[ti])
        return self._layers


def _filled(chunk: _Chunk | Future) -> _Chunk:
    return chunk.result() if isinstance(chunk, Future) else chunk


def _numpy_products(k: int, chunk: _Chunk | Future) -> list[tuple[int, np.ndarray]]:
    """The T x T products of one chunk on the CPU, one per piece present."""
    plan, _, D = _filled(chunk)
    out = []
    for pid, sel in plan:
        Dp = D[:, sel]
        out.append((pid, Dp @ Dp.T))  # A @ A.T of one unit-stride buffer: BLAS dsyrk
    return out


class _DeviceProducts:
    """The T x T products of one chunk on a torch device: the raw chunk is copied there, widened to float64 and
    the anchor subtracted (exact for fp32/bf16/fp16 inputs) in one of ``workers`` device buffers."""

    def __init__(self, device: torch.device, T: int, width: int, workers: int, jobs: Sequence[tuple[int, int, int]]):
        self.device, self.T, self.jobs = device, T, jobs
        self.bufs = [torch.empty(T * width, dtype=torch.float64, device=device) for _ in range(workers)]

    def __call__(self, k: int, chunk: _Chunk | Future) -> list[tuple[int, torch.Tensor]]:
        plan, raws, _ = _filled(chunk)
        dev, T = self.device, self.T
        n = self.jobs[k][2] - self.jobs[k][1]
        Dg = self.bufs[k % len(self.bufs)][: T * n].view(T, n)
        base = raws[0].to(dev, non_blocking=True).to(torch.float64)
        for i in range(T):
            Dg[i].copy_(raws[i + 1].to(dev, non_blocking=True))
        Dg.sub_(base)
        out = []
        for pid, sel in plan:
            Dp = Dg[:, sel] if isinstance(sel, slice) else Dg.index_select(1, torch.as_tensor(sel, device=dev))
            out.append((pid, Dp @ Dp.T))
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # the reader reuses the pinned slot buffers
        return out


@dataclass(frozen=True)
class _PassOptions:
    device: torch.device
    numpy_path: bool
    chunk: int  # flat elements per chunk
    prefetch: bool
    workers: int  # product threads (1 on the device path)

    @property
    def n_slots(self) -> int:
        """Buffer sets: one per product in flight plus the one being read ahead."""
        return self.workers + 1 if self.prefetch else 1


def _in_job_order(stack: ExitStack, n_jobs: int, fill: Callable[[int], _Chunk], product: Callable[..., list],
                  opts: _PassOptions) -> Iterator[tuple[int, list]]:
    """(k, products of chunk k) for every chunk, in job order. With prefetch, one reader thread fills the next
    chunks while ``opts.workers`` threads compute; at most ``n_slots`` chunks are in flight (one per slot)."""
    if not opts.prefetch:
        for k in range(n_jobs):
            yield k, product(k, fill(k))
        return
    reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="ckptaudit-read"))
    pool = stack.enter_context(ThreadPoolExecutor(opts.workers, thread_name_prefix="ckptaudit-gram"))
    pending = {k: pool.submit(product, k, reader.submit(fill, k)) for k in range(min(opts.n_slots, n_jobs))}
    for k in range(n_jobs):
        res = pending.pop(k).result()
        nxt = k + opts.n_slots
        if nxt < n_jobs:  # slot of job k is free again
            pending[nxt] = pool.submit(product, nxt, reader.submit(fill, nxt))
        yield k, res


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
