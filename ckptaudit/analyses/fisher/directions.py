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

from ckptaudit.errors import CorruptFileError, LayoutError, UsageError
from ckptaudit.io.steps import format_steps
from ckptaudit.io.types import RunLike
from ckptaudit.io.vectors import SWITCH_PREFIX, MemoryVectorSink, read_vectors

__all__ = ["RANDOM_BLOCK", "SWITCH_PREFIX", "RandomDirections", "TrunkLayout", "load_block_backbones", "load_vector_file", "random_directions",
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


def _unit(v: torch.Tensor, what: str, source: str) -> torch.Tensor:
    n = float(torch.linalg.vector_norm(v))
    if not math.isfinite(n) or n == 0.0:
        raise CorruptFileError(f"{source}: the {what} direction is zero (or not finite) on the analysed parameters",
                               hint="check that the vectors belong to this model, or analyse another $block", param="block")
    return v / n


def read_directions(path: str | Path | MemoryVectorSink, layout: TrunkLayout) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The directions of a ``backbone --save-vectors`` file (or of a MemoryVectorSink the backbone filled) and its
    block backbones, in one read.

    Directions (each a unit float64 ``[dim]`` in ``layout`` coordinates, renormalised on the layout, e.g. one
    block): "backbone" (V_1), "pc2".."pc6" (V_2..V_6 when the file has them), "switch" (``switch/<tensor>``
    entries, when present). Block backbones: v_b^(l) (each block's own PC1, ``block/<tensor>`` entries) as one
    float64 ``[dim]``, zero on blocks the file has none for; None when it has none (files written before they
    were saved). Only the layout's tensors, and of each only V_1..V_6, are read
    (``ckptaudit.io.vectors.read_vectors``, which also raises the file errors).
    """
    shapes = {p.tensor: tuple(p.tensor_shape) for p in layout.pieces}
    vf = read_vectors(path, shapes, rows=MAX_PC, switch=True, block=True)
    source = str(vf.path)
    out = {"backbone": _unit(layout.flatten(vf.row(0)), "backbone", source)}
    for j in range(1, vf.k):
        flat = layout.flatten(vf.row(j))
        norm = torch.linalg.vector_norm(flat)
        if float(norm) > 0:
            out[f"pc{j + 1}"] = flat / norm
    if vf.switch:
        out["switch"] = _unit(layout.flatten(vf.switch), "switching", source)
    blocks = None
    if vf.block:
        blocks = layout.flatten({n: vf.block.get(n, torch.zeros(shapes[n], dtype=torch.float64)) for n in shapes})
    return out, blocks


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
