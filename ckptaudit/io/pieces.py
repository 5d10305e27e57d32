"""Pieces and architectures (SPEC §0): where each (block, role) part of a checkpoint's tensors lies, and the
per-head slices of the attention projections. Built by :func:`ckptaudit.io.roles.resolve_architecture`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ckptaudit.errors import UnknownArchitectureError, UsageError
from ckptaudit.io.architectures import ROLES, TRUNK_ROLES, Family

GROUPS: dict[str, tuple[str, ...]] = {"G": ("q", "k"), "S": ("v", "o", "mlp_in", "mlp_out")}
ATTENTION_ROLES: tuple[str, ...] = ("q", "k", "v", "o")

# A selection on one axis: (dim, start, stop) keeps a range, (dim, i) keeps one entry and drops the axis.
Selection = tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """Part of one stored tensor with one (block, role).

    ``shape``: the piece's own shape. ``tensor_shape``: the stored tensor's shape. ``view``: a reshape of the
    stored tensor applied before ``index`` (None = none). ``index``: selections (see ``Selection``), at most
    one per axis of the viewed tensor. ``head``: the attention head of a per-head piece (for k/v under
    grouped-query attention, the kv head), None otherwise. ``head_axis`` / ``head_per_entry``: where heads lie
    in the viewed tensor, as runs of ``head_dim`` entries (False) or one entry per head (True); None when the
    piece cannot be split per head. ``head_group``: for the query part of a grouped fused tensor (Falcon), the
    heads per key/value group: head h is entry h // head_group of ``head_axis`` and entry h % head_group of the
    axis after it. ``expert``: the expert of a mixture-of-experts weight (None elsewhere).
    """

    tensor: str
    block: int | None
    role: str
    is_bias: bool
    shape: tuple[int, ...]
    tensor_shape: tuple[int, ...] = ()
    view: tuple[int, ...] | None = None
    index: tuple[Selection, ...] = ()
    head: int | None = None
    head_axis: int | None = None
    head_per_entry: bool = False
    head_group: int | None = None
    expert: int | None = None

    @property
    def numel(self) -> int:
        """Number of scalars in the piece."""
        return math.prod(self.shape)

    @property
    def whole(self) -> bool:
        """True when the piece is the entire stored tensor, in its stored shape."""
        return self.view is None and not self.index

    def _key(self) -> tuple:
        ndim = len(self.view if self.view is not None else self.tensor_shape)
        key: list[Any] = [slice(None)] * ndim
        for sel in self.index:
            key[sel[0]] = sel[1] if len(sel) == 2 else slice(sel[1], sel[2])
        return tuple(key)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The piece's values as a view of the stored tensor ``t`` (shape ``tensor_shape``) -> ``shape``."""
        if tuple(t.shape) != self.tensor_shape:
            raise ValueError(f"{self.tensor}: expected a tensor of shape {self.tensor_shape}, got {tuple(t.shape)}")
        if self.whole:
            return t
        v = t if self.view is None else t.view(self.view)
        return v[self._key()]

    def put(self, full: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Write ``value`` (``shape`` or the same number of scalars) into the piece's place in ``full``, in
        place (used by head transplants). Returns ``full``."""
        target = self.take(full)
        if value.numel() != target.numel():
            raise ValueError(f"{self.tensor}: piece has {target.numel()} values, got {value.numel()}")
        with torch.no_grad():
            target.copy_(value.reshape(target.shape))
        return full


def _piece(tensor: str, block: int | None, role: str, is_bias: bool, tensor_shape: tuple[int, ...],
           view: tuple[int, ...] | None = None, index: tuple[Selection, ...] = (), head: int | None = None,
           head_axis: int | None = None, head_per_entry: bool = False, head_group: int | None = None,
           expert: int | None = None) -> Piece:
    """Build a Piece, deriving its shape from the view and the selections (checked against the bounds)."""
    if view is not None and math.prod(view) != math.prod(tensor_shape):
        raise ValueError(f"{tensor}: cannot view {tensor_shape} as {view}")
    dims = list(view if view is not None else tensor_shape)
    for sel in sorted(index, reverse=True):  # from the last axis, so deleting an axis keeps the others' numbers
        axis = sel[0]
        if len(sel) == 2:
            if not 0 <= sel[1] < dims[axis]:
                raise ValueError(f"{tensor}: entry {sel[1]} out of range on axis {axis} of size {dims[axis]}")
            del dims[axis]
        else:
            if not 0 <= sel[1] <= sel[2] <= dims[axis]:
                raise ValueError(f"{tensor}: range {sel[1:]} out of bounds on axis {axis} of size {dims[axis]}")
            dims[axis] = sel[2] - sel[1]
    return Piece(tensor, block, role, is_bias, tuple(dims), tuple(tensor_shape), view, tuple(index), head,
                 head_axis, head_per_entry, head_group, expert)


_LAYER_INDEX_RE = re.compile(r"\.\d+\.")


# ---------------------------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Architecture:
    """Every tensor of a checkpoint split into (block, role) pieces, plus the attention head layout.

    ``pieces`` cover each stored tensor exactly once. ``kv_group`` = n_heads // n_kv_heads (1 without
    grouped-query attention), known from shapes even when the head counts are not. ``name``: the family used
    (``custom`` for a role map of its own); ``recognised_by``: how it was chosen (which config.json value, or
    tensor names); ``family``: the family's definition (None for ``custom``). ``missing_trunk``: trunk roles
    the family expects that some block lacks, as "block N: role, role" (empty when the trunk is whole).
    """

    name: str
    n_layers: int
    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None
    pieces: tuple[Piece, ...]
    kv_group: int | None = None
    recognised_by: str = ""
    family: Family | None = None
    missing_trunk: tuple[str, ...] = ()
    unplaced: tuple[str, ...] = ()

    @property
    def unplaced_block_weights(self) -> tuple[str, ...]:
        """Matrices (2-D or more) that sit in a numbered layer (``.<n>.`` in the name) but got no role: modules
        the family file does not know, left out of the trunk unless a --role-map places them."""
        names = set(self.unplaced)
        return tuple(p.tensor for p in self.pieces
                     if p.tensor in names and len(p.tensor_shape) >= 2 and _LAYER_INDEX_RE.search(p.tensor))

    @property
    def n_experts(self) -> int:
        """Experts per block of a mixture-of-experts model (0 for a dense model)."""
        experts = {p.expert for p in self.pieces if p.expert is not None}
        return max(experts) + 1 if experts else 0

    def select(self, roles: Iterable[str] | str = TRUNK_ROLES, blocks: Iterable[int] | None = None,
               include_bias: bool = False, experts: Iterable[int] | None = None) -> list[Piece]:
        """Pieces with a role in ``roles`` (a role, a group name "G"/"S", or several roles) and a block in
        ``blocks`` (None = every block, and pieces without a block), biases only with ``include_bias``;
        ``experts`` keeps only the pieces of those experts (None = every piece, dense ones included)."""
        if isinstance(roles, str):
            roles = GROUPS.get(roles, (roles,))
        roles = set(roles)
        unknown = roles - set(ROLES)
        if unknown:
            raise UsageError(f"unknown role(s) {sorted(unknown)}", hint=f"use roles from {ROLES}")
        wanted = None if blocks is None else set(blocks)
        chosen = None if experts is None else set(experts)
        return [p for p in self.pieces
                if p.role in roles and (include_bias or not p.is_bias) and (wanted is None or p.block in wanted)
                and (chosen is None or p.expert in chosen)]

    def tensor_pieces(self, tensor: str) -> list[Piece]:
        """The pieces of one stored tensor, in order."""
        return [p for p in self.pieces if p.tensor == tensor]

    def kv_head(self, q_head: int) -> int:
        """The key/value head that query head ``q_head`` reads under grouped-query attention."""
        if self.kv_group is None:
            raise _heads_unknown(self.name, "the key/value head of a query head")
        if self.n_heads is not None and not 0 <= q_head < self.n_heads:
            raise UsageError(f"query head {q_head} out of range: the model has {self.n_heads} heads")
        return q_head // self.kv_group

    def head_pieces(self, block: int, role: str, head: int) -> list[Piece]:
        """Per-head slices of ``role`` (q/k/v/o) in ``block``: weight piece(s) first, then bias piece(s).

        For k/v ``head`` is the kv head index (see ``kv_head``). Q/K/V heads are output features; O heads are
        the input features that read that head's output. The output bias of o is shared by all heads and is
        not part of any head.
        """
        if role not in ATTENTION_ROLES:
            raise UsageError(f"per-head slicing applies to q/k/v/o, not {role!r}")
        if self.n_heads is None or self.head_dim is None:
            raise _heads_unknown(self.name, f"per-head slices of {role!r}")
        count = self.n_kv_heads if role in ("k", "v") else self.n_heads
        if count is None:
            raise _heads_unknown(self.name, f"per-head slices of {role!r}")
        if not 0 <= head < count:
            raise UsageError(f"head {head} out of range for {role!r}: block {block} has {count} such heads")
        base = [p for p in self.pieces if p.block == block and p.role == role]
        if not base:
            raise UsageError(f"no {role!r} tensor in block {block} of this {self.name} checkpoint")
        out = []
        for p in base:
            if p.head_axis is None:
                if p.is_bias and role == "o":
                    continue
                raise UsageError(f"{p.tensor}: no head layout known for role {role!r}",
                                 hint="give heads (or head_axis) for this pattern in the role map")
            out.append(_head_slice(p, head, count, self.head_dim))
        return sorted(out, key=lambda p: p.is_bias)


def _head_slice(p: Piece, head: int, count: int, head_dim: int) -> Piece:
    """The part of piece ``p`` that belongs to ``head`` (one of ``count`` heads of ``head_dim`` features)."""
    axis = p.head_axis
    sels = {s[0]: s for s in p.index}
    if p.head_group is not None:  # grouped Q: [n_kv, g (+2), dh]; head h is (h // g, h % g)
        sels[axis] = (axis, head // p.head_group)
        sels[axis + 1] = (axis + 1, head % p.head_group)
    elif p.head_per_entry:
        sels[axis] = (axis, head)
    else:
        sel = sels.get(axis)
        start, stop = (sel[1], sel[2]) if sel is not None else (0, (p.view or p.tensor_shape)[axis])
        if stop - start != count * head_dim:
            raise UnknownArchitectureError(
                f"{p.tensor}: {stop - start} features along axis {axis} do not hold {count} heads of {head_dim}",
                hint="check num_attention_heads / num_key_value_heads / head_dim in config.json")
        sels[axis] = (axis, start + head * head_dim, start + (head + 1) * head_dim)
    return _piece(p.tensor, p.block, p.role, p.is_bias, p.tensor_shape, p.view,
                  tuple(sels[a] for a in sorted(sels)), head=head, expert=p.expert)


def _heads_unknown(arch: str, what: str) -> UnknownArchitectureError:
    return UnknownArchitectureError(
        f"{what} needs the number of attention heads, which is unknown for this {arch} checkpoint",
        hint="give the checkpoint's config.json (num_attention_heads / n_head) or n_heads in the role map")
