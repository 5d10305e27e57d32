"""Storage for the M flattened trunk gradients of the fisher analysis: in RAM within the memory budget, else a disk
memmap (never an approximation). Under several ranks each rank stores its own rows; ``gram_gathered`` and
``combine(..., reduce=...)`` compute the exact cross-rank products (see ckptaudit.analyses.fisher.run)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

Visit = Callable[[int, int, torch.Tensor], None]


class GradientStore:
    """M gradient rows of D scalars: on the analysis device when it is a GPU with room for them, else in RAM within
    the memory budget, else a disk memmap.

    ``append(g)`` stores the next row; ``gram()`` = G G^T (float64 ``[M, M]``) in one pass over column chunks;
    ``combine(a)`` = G^T a (float64 ``[D]``) in another. ``close()`` deletes a spill file. Under several ranks,
    ``gram_gathered`` and ``combine(..., reduce=...)`` take every rank's rows (see the module docstring).
    ``where``: "gpu" (rows stay on the GPU: no transfer per gradient, products where the rows are), "ram", or
    "memmap:<path>".
    """

    def __init__(self, rows: int, dim: int, dtype: np.dtype, budget: int, spill_dir: str | None = None,
                 device: str | torch.device = "cpu"):
        self.rows, self.dim, self.count = int(rows), int(dim), 0
        self.nbytes = self.rows * self.dim * np.dtype(dtype).itemsize
        self._tmp: str | None = None
        tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        dev = torch.device(device)
        if dev.type == "cuda" and self.nbytes <= min(budget, torch.cuda.mem_get_info(dev)[0] // 2):
            self.array = torch.empty((self.rows, self.dim), dtype=tdtype, device=dev)
            self.where = "gpu"
        elif self.nbytes <= budget:
            self.array = torch.empty((self.rows, self.dim), dtype=tdtype)
            self.where = "ram"
        else:
            self._tmp = tempfile.mkdtemp(prefix="ckptaudit-fisher-", dir=spill_dir)
            path = Path(self._tmp) / "gradients.f"
            self._memmap = np.memmap(path, dtype=dtype, mode="w+", shape=(self.rows, self.dim))
            self.array = torch.from_numpy(self._memmap)
            self.where = f"memmap:{path}"

    def append(self, g: torch.Tensor) -> None:
        """Store ``g`` ([D], any device) as the next row (no host synchronisation when the rows live on its GPU)."""
        self.array[self.count].copy_(g.detach())
        self.count += 1

    def _chunks(self, chunk_elems: int, rows: int | None = None, align: int = 1):
        """Column ranges of ``chunk_elems // rows`` columns (``rows``: the stored count, or all ranks' rows), a
        multiple of ``align`` (the blocks in which a right-hand factor is drawn) except the last."""
        step = max(1, int(chunk_elems) // max(1, self.count if rows is None else int(rows)))
        step = max(int(align), step - step % int(align))
        for lo in range(0, self.dim, step):
            yield lo, min(self.dim, lo + step)

    def _columns(self, lo: int, hi: int, dev: torch.device) -> torch.Tensor:
        """Columns lo:hi of the stored rows as float64 on ``dev``."""
        return self.array[: self.count, lo:hi].to(dev, torch.float64)

    def gram(self, device: str = "cpu", chunk_elems: int = 1 << 24, visit: Visit | None = None,
             align: int = 1) -> np.ndarray:
        """G G^T over the stored rows, accumulated in float64 on ``device`` in one pass over column chunks.
        ``visit(lo, hi, c)``, when given, sees each chunk's columns ``c`` (float64 ``[count, hi - lo]`` on
        ``device``) on the way, for products with other factors in the same pass; chunks are aligned to
        ``align`` columns."""
        dev = torch.device(device)
        out = torch.zeros((self.count, self.count), dtype=torch.float64, device=dev)
        for lo, hi in self._chunks(chunk_elems, align=align):
            c = self._columns(lo, hi, dev)
            out += c @ c.T
            if visit is not None:
                visit(lo, hi, c)
        return out.cpu().numpy()

    def gram_gathered(self, ctx: Any, rows: int, device: str = "cpu", chunk_elems: int = 1 << 24,
                      visit: Visit | None = None, align: int = 1) -> np.ndarray | None:
        """G G^T over the rows of all ranks of ``ctx`` (rank r holds rows r, r + W, ... of ``rows``), on rank 0.

        Rank 0 gathers one column chunk of every rank's rows at a time (in the stored dtype) and puts them in row
        order, so each chunk, its width and its float64 product are those of one store holding all ``rows``.
        Returns None on the other ranks. ``visit`` as :meth:`gram`, with this rank's own rows. Every rank must
        call it (it is a collective).
        """
        world = int(ctx.world_size)
        per = -(-int(rows) // world)
        counts = [len(range(r, int(rows), world)) for r in range(world)]
        if self.count != counts[ctx.rank]:
            raise ValueError(f"rank {ctx.rank} holds {self.count} gradient rows, expected {counts[ctx.rank]}")
        dev = torch.device(device)
        out = torch.zeros((rows, rows), dtype=torch.float64, device=dev) if ctx.is_main else None
        np_dtype = np.dtype(str(self.array.dtype).replace("torch.", ""))
        for lo, hi in self._chunks(chunk_elems, rows, align=align):
            if visit is not None and self.count:
                visit(lo, hi, self._columns(lo, hi, dev))
            part = np.zeros((per, hi - lo), dtype=np_dtype)
            part[: self.count] = self.array[: self.count, lo:hi].cpu().numpy()
            got = ctx.gather(part)
            if got is None:
                continue
            full = np.empty((rows, hi - lo), dtype=np_dtype)
            for r, g in enumerate(got):
                full[r::world] = g[: counts[r]]
            c = torch.from_numpy(full).to(dev, torch.float64)
            out += c @ c.T
        return None if out is None else out.cpu().numpy()

    def combine(self, a: np.ndarray, device: str = "cpu", chunk_elems: int = 1 << 24, rows: int | None = None,
                reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """G^T a (float64 ``[D]``) for coefficients ``a`` ([M]).

        Several ranks: ``a`` holds the coefficients of this rank's rows, ``rows`` the row count of all ranks (for
        the same chunks as :meth:`gram_gathered`) and ``reduce`` sums a chunk over ranks (a collective).
        """
        dev = torch.device(device)
        at = torch.as_tensor(np.asarray(a, dtype=np.float64), device=dev)
        if reduce is None:  # one product per chunk, one transfer to the host at the end
            out_t = torch.empty(self.dim, dtype=torch.float64, device=dev)
            for lo, hi in self._chunks(chunk_elems, rows):
                out_t[lo:hi] = at @ self._columns(lo, hi, dev)
            return out_t.cpu().numpy()
        out = np.empty(self.dim, dtype=np.float64)
        for lo, hi in self._chunks(chunk_elems, rows):
            out[lo:hi] = reduce((at @ self._columns(lo, hi, dev)).cpu().numpy())
        return out

    def close(self) -> None:
        """Drop the rows; remove the spill directory, if any."""
        self.array = torch.empty((0, 0))
        self._memmap = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
