"""Parameter layout and probe directions for the fisher analysis (SPEC §2).

A :class:`TrunkLayout` fixes the order in which the trunk (or one block) is flattened into a vector of D scalars:
the trunk pieces sorted by block (stable, so each block is one contiguous range and the order within a block is
the architecture's piece order), each piece flattened in row-major order. Gradients, the backbone, PCs, switching
and random directions all live in this one coordinate system.

Directions come from a ``backbone --save-vectors`` file (key = tensor name, value ``[k, *tensor_shape]``, entry j =
V_{j+1}, zero outside the trunk; optional keys ``switch/<tensor name>`` hold a switching direction), from a
switching pair of checkpoints, or are drawn at random orthogonal to the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.analyses.fisher.store import GradientStore
from ckptaudit.errors import CorruptFileError, LayoutError, UsageError
from ckptaudit.io.steps import format_steps
from ckptaudit.io.types import RunLike
from ckptaudit.io.vectors import SWITCH_PREFIX, MemoryVectorSink, open_vectors

__all__ = ["RANDOM_BLOCK", "SWITCH_PREFIX", "DirectionRows", "RandomDirections", "TrunkLayout", "direction_rows", "tensor_rows", "load_block_backbones", "load_vector_file", "random_directions",
           "read_directions", "switch_direction", "trunk_layout"]

MAX_PC = 6


@dataclass(frozen=True, eq=False)
class TrunkLayout:
    """Flattening of the selected trunk pieces into one vector of ``dim`` scalars.

    ``pieces``: in flat order (sorted by block). ``offsets[i]``: start of piece i. ``block_ranges``: block ->
    (start, stop) in the flat vector. ``tensors``: names of the stored tensors holding a piece, first-seen order.
    """

    pieces: tuple[Any, ...]
    offsets: tuple[int, ...]
    dim: int
    block_ranges: dict[int, tuple[int, int]]
    tensors: tuple[str, ...]

    def flatten(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Concatenate the pieces of full-shape ``tensors`` (name -> tensor) -> ``[dim]``."""
        parts = []
        for p in self.pieces:
            if p.tensor not in tensors:
                raise KeyError(p.tensor)
            t = p.take(tensors[p.tensor]).reshape(-1)
            parts.append(t if dtype is None else t.to(dtype))
        return torch.cat(parts)

    def unflatten(self, flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`flatten`: full-shape tensors (dtype/device of ``like``), zero outside the pieces."""
        out = {n: torch.zeros_like(like[n]) for n in self.tensors}
        for p, start in zip(self.pieces, self.offsets, strict=True):
            p.put(out[p.tensor], flat[start : start + p.numel].to(out[p.tensor].dtype))
        return out


def trunk_layout(arch: Any, block: int | None = None, include_bias: bool = False) -> TrunkLayout:
    """The layout of the trunk (q, k, v, o, mlp_in, mlp_out of every block) or of block ``block`` alone."""
    from ckptaudit.io.roles import TRUNK_ROLES

    pieces = [p for p in arch.select(TRUNK_ROLES, None, include_bias) if p.block is not None]
    if not pieces:
        raise UsageError("the checkpoint has no trunk parameters (q, k, v, o, mlp_in, mlp_out of a block)",
                         "pass $role_map to tell ckptaudit which tensors are the transformer blocks", param="role_map")
    present = sorted({p.block for p in pieces})
    if block is not None:
        if block not in present:
            raise UsageError(f"$block={block}: the model has blocks {present[0]}..{present[-1]}", param="block")
        pieces = [p for p in pieces if p.block == block]
    order = sorted(range(len(pieces)), key=lambda i: (pieces[i].block, i))
    pieces = [pieces[i] for i in order]
    offsets, ranges, pos = [], {}, 0
    for p in pieces:
        offsets.append(pos)
        lo, _ = ranges.get(p.block, (pos, pos))
        pos += p.numel
        ranges[p.block] = (lo, pos)
    names = tuple(dict.fromkeys(p.tensor for p in pieces))
    return TrunkLayout(tuple(pieces), tuple(offsets), pos, ranges, names)


def _norm_of(v: torch.Tensor, what: str, source: str) -> float:
    """||v||, or the error naming ``source`` when it is zero or not finite."""
    n = float(torch.linalg.vector_norm(v))
    if not math.isfinite(n) or n == 0.0:
        raise CorruptFileError(f"{source}: the {what} direction is zero (or not finite) on the analysed parameters",
                               hint="check that the vectors belong to this model, or analyse another $block", param="block")
    return n


def _unit(v: torch.Tensor, what: str, source: str) -> torch.Tensor:
    return v / _norm_of(v, what, source)


@dataclass(eq=False)
class DirectionRows:
    """The named directions in ``layout`` coordinates, as float64 rows of one :class:`GradientStore` (in RAM within
    a memory budget, else a disk memmap), each held once: ``names`` ("backbone" first) at rows ``index``, unit on
    the layout; the last row holds v_b^(l) on each block's segment, unit there (the block's own backbone where the
    vectors have one, else the trunk's v_b restricted to the block; NaN for a block where it is zero), so b_l is a
    segment dot product. ``own_blocks``: whether the vectors had block backbones. ``close()`` removes a memmap."""

    names: tuple[str, ...]
    index: tuple[int, ...]
    store: GradientStore
    own_blocks: bool

    def row(self, name: str) -> torch.Tensor:
        """Direction ``name`` (a view of its row)."""
        return self.store.array[self.index[self.names.index(name)]]

    @property
    def vb_blocks(self) -> torch.Tensor:
        return self.store.array[self.store.rows - 1]

    def cosines(self) -> dict[str, float]:
        """<v_b, v> for every other named direction."""
        vb = self.row("backbone")
        return {n: float(torch.dot(vb, self.row(n))) for n in self.names if n != "backbone"}

    def close(self) -> None:
        self.store.close()


def _rows_store(n_rows: int, dim: int, budget: int | None, spill_dir: str | None) -> GradientStore:
    store = GradientStore(n_rows, dim, np.dtype("float64"), (1 << 62) if budget is None else int(budget), spill_dir)
    store.count = n_rows
    return store


def _finish_blocks(layout: TrunkLayout, rows: GradientStore, own: bool) -> None:
    """Turn the last row (own block backbones, zero where none) into v_b^(l) per block segment (see DirectionRows)."""
    vb, out = rows.array[0], rows.array[rows.rows - 1]
    for lo, hi in layout.block_ranges.values():
        if not (own and float(torch.linalg.vector_norm(out[lo:hi])) > 0):
            out[lo:hi] = vb[lo:hi]
        n = torch.linalg.vector_norm(out[lo:hi])
        out[lo:hi] = out[lo:hi] / n if n > 0 else float("nan")


def direction_rows(vectors: str | Path | MemoryVectorSink, layout: TrunkLayout, switch: torch.Tensor | None = None,
                   budget: int | None = None, spill_dir: str | None = None) -> DirectionRows:
    """The directions of a ``backbone --save-vectors`` file (or of a MemoryVectorSink the backbone filled), read
    one tensor and one row at a time straight into their rows, never all at once.

    Directions (each unit float64 in ``layout`` coordinates, renormalised on the layout, e.g. one block):
    "backbone" (V_1), "pc2".."pc6" (V_2..V_6 where the file has them and they are nonzero on the layout),
    "switch" (``switch`` when given, else the file's ``switch/<tensor>`` entries when present). Only the layout's
    tensors, and of each only V_1..V_6, are read (``ckptaudit.io.vectors.open_vectors``, which also raises the file
    errors). ``budget``: bytes the rows may take in RAM before they go to a memmap in ``spill_dir`` (None: no limit).
    """
    shapes = {p.tensor: tuple(p.tensor_shape) for p in layout.pieces}
    pieces: dict[str, list[tuple[Any, int]]] = {}
    for piece, off in zip(layout.pieces, layout.offsets, strict=True):
        pieces.setdefault(piece.tensor, []).append((piece, off))
    with open_vectors(vectors, shapes, rows=MAX_PC, switch=switch is None, block=True) as ov:
        k, has_switch = ov.k, switch is not None or bool(ov.switch_names)
        rows = _rows_store(k + has_switch + 1, layout.dim, budget, spill_dir)
        arr = rows.array
        try:
            sq = 0.0

            def put(r: int, name: str, t: torch.Tensor) -> None:
                for piece, off in pieces[name]:
                    arr[r, off : off + piece.numel] = piece.take(t).reshape(-1)

            for name in ov.names:
                for j in range(k):
                    t = ov.row(name, j)
                    sq += float((t * t).sum()) if j == 0 else 0.0
                    put(j, name, t)
                if switch is None and ov.switch_names:
                    put(k, name, ov.switch(name))
                put(rows.rows - 1, name, ov.block(name) if name in ov.block_names else torch.zeros(shapes[name]))
            ov.check_backbone(sq)
            source = str(ov.path)
            names, index = ["backbone"], [0]
            arr[0].div_(_norm_of(arr[0], "backbone", source))
            for j in range(1, k):
                norm = torch.linalg.vector_norm(arr[j])
                if float(norm) > 0:
                    arr[j].div_(norm)
                    names.append(f"pc{j + 1}")
                    index.append(j)
            if has_switch:
                if switch is not None:  # unit already (switch_direction)
                    arr[k] = switch.to("cpu", torch.float64)
                else:
                    arr[k].div_(_norm_of(arr[k], "switching", source))
                names.append("switch")
                index.append(k)
            _finish_blocks(layout, rows, bool(ov.block_names))
        except BaseException:
            rows.close()
            raise
    return DirectionRows(tuple(names), tuple(index), rows, bool(ov.block_names))


def tensor_rows(layout: TrunkLayout, directions: Mapping[str, torch.Tensor] | dict[str, torch.Tensor],
                block_backbone: torch.Tensor | None = None, consume: bool = False, budget: int | None = None,
                spill_dir: str | None = None) -> DirectionRows:
    """:class:`DirectionRows` of "backbone" and the other named ``directions`` (float64 ``[D]``, unit: copied as
    they are), one row at a time; with ``consume``, each is popped from the caller's dict as it goes.
    ``block_backbone``: the blocks' own backbones (zero on blocks without one)."""
    named = ("backbone", *[n for n in directions if n != "backbone"])
    rows = _rows_store(len(named) + 1, layout.dim, budget, spill_dir)
    for i, name in enumerate(named):
        rows.array[i] = (directions.pop(name) if consume else directions[name]).to("cpu", torch.float64)  # type: ignore[union-attr]
    last = rows.array[rows.rows - 1]
    last.zero_()
    if block_backbone is not None:
        last.copy_(block_backbone.to("cpu", torch.float64))
    _finish_blocks(layout, rows, block_backbone is not None)
    return DirectionRows(named, tuple(range(len(named))), rows, block_backbone is not None)


def read_directions(path: str | Path | MemoryVectorSink, layout: TrunkLayout) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The directions of :func:`direction_rows` as a dict of float64 ``[dim]`` tensors, and the block backbones
    v_b^(l) per segment (its last row) or None when the file has none (files written before they were saved)."""
    rows = direction_rows(path, layout)
    out = {name: rows.row(name) for name in rows.names}
    return out, (rows.vb_blocks if rows.own_blocks else None)


def load_vector_file(path: str | Path, layout: TrunkLayout) -> dict[str, torch.Tensor]:
    """The directions of :func:`read_directions`."""
    return read_directions(path, layout)[0]


def load_block_backbones(path: str | Path, layout: TrunkLayout) -> torch.Tensor | None:
    """The block backbones of :func:`read_directions`."""
    return read_directions(path, layout)[1]


def switch_direction(run: RunLike, peak: int, trough: int, layout: TrunkLayout) -> torch.Tensor:
    """v_sw = (theta_peak - theta_trough) / ||.|| on the layout, float64 ``[dim]`` (SPEC §1)."""
    ckpts = {int(c.step): c for c in run.checkpoints}
    for s in (peak, trough):
        if s not in ckpts:
            raise UsageError(f"$switch={peak}:{trough}: no checkpoint at step {s}",
                             f"steps: {format_steps(sorted(ckpts))}", param="switch")
    flats = []
    for s in (peak, trough):
        with ckpts[s].tensors() as src:
            try:
                flats.append(layout.flatten({n: src.get(n) for n in layout.tensors}, torch.float64))
            except KeyError as exc:
                raise LayoutError(f"{ckpts[s].path}: tensor {exc.args[0]} missing for the switching direction") from None
    return _unit(flats[0] - flats[1], f"switching ({peak}:{trough})", str(run.path))


RANDOM_BLOCK = 1 << 14  # columns per seeded draw: a range of the random directions is rebuilt from its blocks alone
_INIT_BLOCKS = 8  # blocks per step of the one pass that fixes the K x K factors


class RandomDirections:
    """K unit directions orthogonal to ``v_b`` and to each other, defined block by block so that no ``[K, D]``
    matrix is ever held: fisher's memory does not grow with K x D (SPEC §2).

    Draws: columns ``[b B, (b + 1) B)`` of row k of Z (``[K, D]``, B = RANDOM_BLOCK) are standard normals from
    numpy's PCG64 seeded with ``stable_seed("fisher-random", seed, k, b)``. Any column range is rebuilt on its own,
    on every device alike, and the first k directions do not depend on K.

    Directions: W = L^-1 (Z - (Z v) v^T), with v = v_b / ||v_b|| and L the Cholesky factor of
    C = Z Z^T - (Z v)(Z v)^T, the Gram matrix of the draws with v projected out. Row k of W is a combination of
    the projected draws 1..k with a positive coefficient on its own, and W W^T = L^-1 C L^-T = I: it is the
    Gram-Schmidt orthonormalisation of the draws against v_b and each other (the Q of their QR factorisation). So
    the projections of gradients G (``[M, D]``) are
    G W^T = (G Z^T - (G v)(Z v)^T) L^-T, which needs only G Z^T (one pass over the columns, the draws regenerated
    chunk by chunk), G v and the K x K factors. One pass over the draws, here, fixes Z v and Z Z^T.
    """

    def __init__(self, v_b: torch.Tensor, k: int, seed: int):
        from ckptaudit.sampling import stable_seed

        self.dim, self.k, self.seed = int(v_b.numel()), int(k), int(seed)
        if self.k >= self.dim:
            raise UsageError(f"$n_random={k}: at most {self.dim - 1} directions fit orthogonal to the backbone in "
                             f"dimension {self.dim}", param="n_random")
        self._stable_seed = stable_seed
        self._v = v_b.detach()
        self._norm = float(torch.linalg.vector_norm(self._v.to(torch.float64)))
        zz = np.zeros((self.k, self.k))
        zv = np.zeros(self.k)
        step = RANDOM_BLOCK * _INIT_BLOCKS
        for lo in range(0, self.dim, step):
            hi = min(self.dim, lo + step)
            z = self.draws(lo, hi)
            zz += z @ z.T
            zv += z @ self._unit_v(lo, hi)
        self.zv = zv
        gram = zz - np.outer(zv, zv)
        self.linv = np.linalg.inv(np.linalg.cholesky(gram)) if self.k else np.zeros((0, 0))

    def _unit_v(self, lo: int, hi: int) -> np.ndarray:
        return self._v[lo:hi].to("cpu", torch.float64).numpy() / self._norm

    def draws(self, lo: int, hi: int) -> np.ndarray:
        """Columns lo:hi of the draws Z, float64 ``[K, hi - lo]``."""
        out = np.empty((self.k, hi - lo))
        for b in range(lo // RANDOM_BLOCK, -(-hi // RANDOM_BLOCK)):
            b_lo, b_hi = b * RANDOM_BLOCK, min(self.dim, (b + 1) * RANDOM_BLOCK)
            a, e = max(lo, b_lo), min(hi, b_hi)
            for j in range(self.k):
                block = np.random.default_rng(self._stable_seed("fisher-random", self.seed, j, b)).standard_normal(b_hi - b_lo)
                out[j, a - lo : e - lo] = block[a - b_lo : e - b_lo]
        return out

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Columns lo:hi of the directions W, float64 ``[K, hi - lo]``."""
        return self.linv @ (self.draws(lo, hi) - np.outer(self.zv, self._unit_v(lo, hi)))

    def project(self, gz: np.ndarray, gv: np.ndarray) -> np.ndarray:
        """G W^T (``[M, K]``) from G Z^T (``[M, K]``) and G v_b (``[M]``, with the v_b this was built on)."""
        return (np.asarray(gz) - np.outer(np.asarray(gv) / self._norm, self.zv)) @ self.linv.T

    def materialise(self) -> torch.Tensor:
        """W as one float64 CPU ``[K, D]`` tensor (the Hessian-vector products and the tests need it whole)."""
        out = torch.empty((self.k, self.dim), dtype=torch.float64)
        step = RANDOM_BLOCK * _INIT_BLOCKS
        for lo in range(0, self.dim, step):
            hi = min(self.dim, lo + step)
            out[:, lo:hi] = torch.from_numpy(self.rows(lo, hi))
        return out


def random_directions(v_b: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The K directions of :class:`RandomDirections` (unit, orthogonal to ``v_b`` and to each other) as one float64
    CPU ``[k, dim]`` tensor."""
    return RandomDirections(v_b, k, seed).materialise()
