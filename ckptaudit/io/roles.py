"""Parameter roles (SPEC §0): every tensor of a checkpoint split into (block, role) pieces, per-head slices.

A :class:`Piece` is a part of one stored tensor that has one (block, role): a whole tensor, one part of a fused
projection (Q/K/V, gate/up), one expert of a stacked mixture-of-experts tensor, or one attention head. It only describes *where* the values lie (an
optional reshape ``view`` of the stored tensor, then basic indexing), so ``take`` returns a view and nothing
is copied. Pieces are frozen, hashable and picklable, so they travel to worker processes.

:func:`resolve_architecture` maps tensor names (and shapes) to pieces using the family files read by
``architectures.py`` (the family is looked up from ``config.json``, or from tensor names when there is none),
the head counts of ``config.json``, and an optional user role map of the same schema.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError, UnknownArchitectureError, UsageError
from ckptaudit.io import architectures as fam
from ckptaudit.io.architectures import ROLES, TRUNK_ROLES, Family, Rule
from ckptaudit.io.layouts import split

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


# ---------------------------------------------------------------------------------------------------- role map


_LAYER_INDEX_RE = re.compile(r"\.\d+\.")


def load_role_map(path: str | Path) -> Family:
    """Read a user role map (TOML, or JSON when it starts with '{') by the family-file schema.

    A file with ``name`` or ``extends`` is a family of its own (used as given); a file of rules alone is an
    overlay, tried before the recognised family. The older forms are accepted: ``{"roles": [{"pattern",
    "role", "head_axis"}], "n_heads": ...}`` and ``{regex: role}``.
    """
    path = Path(path)
    text = fam.read_text(path, "role map")
    return fam.family_from_dict(fam.parse_text(text, f"role map {path}"), str(path), fam.shipped_families(),
                                require_name=False)


def _coerce_role_map(role_map: Any) -> Family | None:
    if role_map is None or isinstance(role_map, Family):
        return role_map
    if isinstance(role_map, (str, Path)):
        return load_role_map(role_map)
    if isinstance(role_map, Mapping):
        return fam.family_from_dict(role_map, "role map", fam.shipped_families(), require_name=False)
    raise TypeError(f"role_map must be a Family, a path or a dict, not {type(role_map).__name__}")


def _is_overlay(user: Family | None) -> bool:
    """A role map of rules alone: tried before the recognised family rather than replacing it."""
    return user is not None and user.name == "custom" and user.extends is None


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


# --------------------------------------------------------------------------------------------------- resolve


def _as_dict(config: Any) -> Mapping | None:
    if config is None or isinstance(config, Mapping):
        return config
    if not callable(getattr(config, "to_dict", None)):
        raise CorruptFileError(f"config.json must hold a JSON object, got {type(config).__name__}",
                               hint="re-save the config (model.config.save_pretrained(dir))")
    return config.to_dict()


def _config_dims(config: Mapping | None, family: Family | None) -> dict[str, int | None]:
    """n_heads, n_kv_heads, head_dim, hidden from a config.json dict, by the family's config keys."""
    out: dict[str, int | None] = dict.fromkeys(("n_heads", "n_kv_heads", "head_dim", "hidden"))
    if config is None:
        return out
    keys = family.keys_for if family is not None else (lambda what: fam.DEFAULT_CONFIG_KEYS[what])
    if not any(k in config for k in keys("n_heads")) and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]  # multimodal wrappers keep the language model's dims here
    for what in out:
        for k in keys(what):
            value = config.get(k)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise CorruptFileError(f"config.json: {k!r} must be an integer, got {value!r}",
                                       hint="fix config.json, or re-save it (model.config.save_pretrained(dir))")
            try:
                number = int(value)
            except (TypeError, ValueError, OverflowError):
                raise CorruptFileError(f"config.json: {k!r} must be an integer, got {value!r}",
                                       hint="fix config.json, or re-save it (model.config.save_pretrained(dir))"
                                       ) from None
            if what in ("n_heads", "n_kv_heads") and number < 1:
                raise CorruptFileError(f"config.json: {k!r} must be at least 1, got {number}",
                                       hint="fix the head count in config.json")
            out[what] = number
            break
    return out


def _axes(rule: Rule, shape: tuple[int, ...], orientation: str | None) -> tuple[int, int | None]:
    """(output axis, input axis) of a stored tensor: the matrix axes are those left after the experts axis;
    Linear stores [out, in], Conv1D [in, out]; a vector (bias) has only the output axis."""
    mat = [i for i in range(len(shape)) if i != rule.experts]
    if not mat:
        return 0, None
    if len(mat) == 1:
        return mat[0], None
    if orientation == "conv1d":
        return mat[1], mat[0]
    return mat[0], mat[1]


def _plain_head_axis(rule: Rule, role: str, is_bias: bool, out_axis: int, in_axis: int | None,
                     orientation: str | None) -> int | None:
    """Where the heads of a plain (unfused) q/k/v/o tensor lie, or None."""
    if role not in ATTENTION_ROLES or rule.heads == "none":
        return None
    if is_bias:  # q/k/v biases are one run per head; the output bias of o is shared by every head
        return None if role == "o" or (rule.heads is None and orientation is None) else out_axis
    if isinstance(rule.heads, int):
        return rule.heads
    side = rule.heads or (None if orientation is None else ("in" if role == "o" else "out"))
    return None if side is None else (out_axis if side == "out" else in_axis)


def _pieces_of_rule(name: str, shape: tuple[int, ...], rule: Rule, m: re.Match, dims: dict[str, int | None],
                    orientation: str | None, found: dict) -> list[Piece]:
    """Pieces of one stored tensor matched by ``rule``. ``found`` collects dimensions a layout determined."""
    groups = m.groupdict()
    block = int(groups["block"]) if groups.get("block") is not None else None
    named_expert = int(groups["expert"]) if groups.get("expert") is not None else None
    kind = rule.kind or groups.get("kind")
    is_bias = kind == "bias" if kind is not None else (name.endswith("bias") and len(shape) == 1)
    out_axis, in_axis = _axes(rule, shape, orientation)
    if rule.experts is not None and rule.experts >= len(shape):
        raise UnknownArchitectureError(f"{name}: no experts axis {rule.experts} in a tensor of shape {shape}",
                                       hint="check 'experts' in the architecture file or --role-map")
    experts = range(shape[rule.experts]) if rule.experts is not None else [named_expert]
    pieces = []
    for e in experts:
        base = ((rule.experts, e),) if rule.experts is not None else ()
        if rule.fused is None:
            head_axis = _plain_head_axis(rule, rule.role, is_bias, out_axis, in_axis, orientation)
            pieces.append(_piece(name, block, rule.role, is_bias, shape, index=base, head_axis=head_axis,
                                 expert=e))
            continue
        parts, more = split(rule.fused, name, shape, out_axis, base, dims)
        found.update(more)
        for part in parts:
            pieces.append(_piece(name, block, rule.parts[part.index], is_bias, shape, view=part.view,
                                 index=part.selections, head_axis=part.head_axis,
                                 head_per_entry=part.head_per_entry, head_group=part.head_group, expert=e))
    return pieces


def _head_extent(p: Piece) -> int | None:
    """Features along the head axis of a run-laid-out piece (None for other layouts)."""
    if p.head_axis is None or p.head_per_entry or p.head_group is not None:
        return None
    for sel in p.index:
        if sel[0] == p.head_axis:
            return sel[2] - sel[1]
    return (p.view or p.tensor_shape)[p.head_axis]


def _unknown_error(unplaced: list[str], total: int) -> UnknownArchitectureError:
    shown = ", ".join(unplaced[:10]) + (f" ... and {len(unplaced) - 10} more" if len(unplaced) > 10 else "")
    # The example pattern is built from an unplaced name, preferring one with a block number.
    sample = next((n for n in unplaced if re.search(r"\.\d+\.", n)), unplaced[0])
    first = re.sub(r"\\\.\d+\\\.", r"\\.(?P<block>\\d+)\\.", re.escape(sample))
    example = json.dumps({"roles": [{"pattern": first + "$", "role": "q"}, {"pattern": ".*", "role": "other"}]})
    return UnknownArchitectureError(
        f"cannot place {len(unplaced)} of {total} tensors in any known architecture ({fam.known_names()}): {shown}",
        hint=f"pass --role-map FILE mapping tensor names to roles {list(ROLES)}, e.g. {example}")


def _place(family: Family, names: list[str], shapes: Mapping[str, tuple[int, ...]], config: Mapping | None,
           explicit: dict[str, int | None]) -> tuple[dict[str, list[Piece]], dict[str, int | None]]:
    """Pieces of ``names`` under ``family`` (tensors no rule names get role "other"), and the dimensions used."""
    dims = _config_dims(config, family)
    for key in ("n_heads", "n_kv_heads", "head_dim"):
        value = explicit.get(key) or getattr(family, key)
        if value is not None:
            dims[key] = value
    orientation = family.orientation_for(shapes)
    found: dict = {}
    by_name: dict[str, list[Piece]] = {}
    for name in names:
        hit = family.match(name)
        if hit is None:  # a buffer or extra module inside a known architecture
            by_name[name] = [_piece(name, None, "other", False, shapes[name])]
        else:
            by_name[name] = _pieces_of_rule(name, shapes[name], hit[0], hit[1], dims, orientation, found)
    for key, value in found.items():
        dims[key] = dims.get(key) or value
    return by_name, dims


def _fits(family: Family, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """False when the family's orientation probe contradicts the shapes (e.g. GPT-2 Conv1D vs nanoGPT Linear)."""
    try:
        family.orientation_for(shapes)
    except UnknownArchitectureError:
        return False
    return True


def recognise(shapes: Mapping[str, tuple[int, ...]], config: Mapping | None = None,
              families: Mapping[str, Family] | None = None) -> tuple[Family | None, str]:
    """The family of a checkpoint and how it was found: from config.json (``architectures``, then
    ``model_type``) when a family lists the value, else from tensor-name signatures. Families whose orientation
    probe contradicts the shapes are passed over. Several families matching the names equally well are fine
    when they place every tensor alike (the ``generic`` one, e.g. llama, is named); otherwise an
    UnknownArchitectureError names the candidates. (None, "") when nothing matches."""
    families = fam.shipped_families() if families is None else families
    names = list(shapes)
    hits, how = fam.by_config(config, families)
    fitting = [f for f in hits if _fits(f, shapes)]
    if len(fitting) == 1:
        return fitting[0], how
    note = ""
    if hits and not fitting:
        note = f"; {how} names {', '.join(f.name for f in hits)}, whose layout does not fit"
    elif not hits and config is not None:
        archs, model_type = fam.config_names(config)
        named = ", ".join([*archs, *([model_type] if model_type else [])])
        note = f"; config.json names {named}, which no family file lists" if named else ""
    pool = fitting or [f for f in families.values() if _fits(f, shapes)]
    scores = {f.name: fam.signature_score(f, names) for f in pool}
    best = max(scores.values(), default=0)
    if best == 0:
        return None, ""
    top = sorted((f for f in pool if scores[f.name] == best), key=lambda f: (not f.generic, f.name))
    if len(top) == 1:
        return top[0], f"tensor names{note}"
    layouts = [_place(f, names, shapes, config, {})[0] for f in top]
    if all(layout == layouts[0] for layout in layouts[1:]):
        return top[0], f"tensor names (the same layout as {', '.join(f.name for f in top[1:])}){note}"
    raise UnknownArchitectureError(
        f"the tensor names fit several architecture families that place them differently: "
        f"{', '.join(f.name for f in top)}{note}",
        hint="put the model's config.json beside the weights, or pass --role-map with extends = \"FAMILY\"")


def resolve_architecture(shapes: Mapping[str, tuple[int, ...]], config: Any = None,
                         role_map: Family | str | Path | Mapping | None = None,
                         allow_partial_trunk: bool = True) -> Architecture:
    """Split every tensor of a checkpoint into (block, role) pieces.

    ``shapes``: tensor name -> stored shape. ``config``: the checkpoint's config.json (which family, head
    counts). ``role_map``: a user family or overlay (a Family, a path, or a dict; see ``load_role_map``).
    Tensors inside a recognised family that no rule names get role "other"; when no family is recognised,
    tensors that no user rule names raise UnknownArchitectureError. ``allow_partial_trunk=False`` makes a trunk
    that lacks a role the family expects in some block (e.g. experts no rule places) an error.
    """
    shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
    config = _as_dict(config)
    user = _coerce_role_map(role_map)
    explicit = {k: getattr(user, k) for k in ("n_heads", "n_kv_heads", "head_dim")} if user else {}
    by_name: dict[str, list[Piece]] = {}
    rest = list(shapes)
    if _is_overlay(user):
        rest = []
        for name, shape in shapes.items():
            hit = user.match(name)
            if hit is None:
                rest.append(name)
            else:
                by_name[name] = _pieces_of_rule(name, shape, hit[0], hit[1], _overlay_dims(config, explicit),
                                                user.orientation, {})
    if user is not None and not _is_overlay(user):
        family, how = user, f"role map {user.source}"
    else:
        family, how = recognise({n: shapes[n] for n in rest}, config) if rest else (None, "")
    if family is None and rest:
        raise _unknown_error(rest, len(shapes))
    dims = _overlay_dims(config, explicit)
    if family is not None:
        placed, dims = _place(family, rest, shapes, config, explicit)
        by_name.update(placed)
    pieces = tuple(p for name in shapes for p in by_name[name])
    name = family.name if family is not None else "custom"
    if _is_overlay(user):
        how = f"role map {user.source}" + (f", then {family.name} ({how})" if family is not None else "")
    unplaced = tuple(n for n in rest if family is None or family.match(n) is None)
    arch = _finish(name, pieces, dims, how, family, unplaced)
    if not allow_partial_trunk and arch.missing_trunk:
        raise partial_trunk_error(arch)
    return arch


def _overlay_dims(config: Mapping | None, explicit: dict[str, int | None]) -> dict[str, int | None]:
    dims = _config_dims(config, None)
    dims.update({k: v for k, v in explicit.items() if v is not None})
    return dims


def partial_trunk_error(arch: Architecture) -> UnknownArchitectureError:
    """The error for a trunk missing roles its family expects (see ``Architecture.missing_trunk``)."""
    unplaced = arch.unplaced_block_weights
    extra = f"; weights no rule places: {', '.join(unplaced[:4])}{' ...' if len(unplaced) > 4 else ''}" if unplaced else ""
    return UnknownArchitectureError(
        f"the {arch.name} trunk is incomplete ({'; '.join(arch.missing_trunk[:3])}"
        f"{' ...' if len(arch.missing_trunk) > 3 else ''}){extra}",
        hint="pass --role-map to place those weights, or --allow-partial-trunk to analyse what is placed")


def _missing_trunk(family: Family | None, pieces: tuple[Piece, ...], n_layers: int) -> tuple[str, ...]:
    if family is None:
        return ()
    have: dict[int, set[str]] = {}
    for p in pieces:
        if p.block is not None and not p.is_bias:
            have.setdefault(p.block, set()).add(p.role)
    out = []
    for block in range(n_layers):
        lacking = [r for r in family.trunk_roles if r not in have.get(block, set())]
        if lacking:
            out.append(f"block {block}: no {', '.join(lacking)}")
    return tuple(out)


def _finish(name: str, pieces: tuple[Piece, ...], dims: dict[str, int | None], how: str,
            family: Family | None, unplaced: tuple[str, ...] = ()) -> Architecture:
    """Derive head_dim / n_kv_heads / kv_group from the config and the shapes, checking they agree."""
    blocks = [p.block for p in pieces if p.block is not None]
    n_layers = max(blocks) + 1 if blocks else 0
    n_heads, n_kv, head_dim = dims["n_heads"], dims["n_kv_heads"], dims["head_dim"]

    def first_weight(role):
        return next((p for p in pieces if p.role == role and not p.is_bias and p.head_axis is not None), None)

    q, k = first_weight("q"), first_weight("k")
    if q is not None and (q.head_per_entry or q.head_group is not None):  # the view holds [.., dh, ...]
        head_dim = head_dim or q.view[q.head_axis + 2]
    q_ext, k_ext = (_head_extent(q) if q else None), (_head_extent(k) if k else None)
    if head_dim is None and n_heads is not None:
        if q_ext is not None:
            head_dim = q_ext // n_heads
        elif dims["hidden"] is not None:
            head_dim = dims["hidden"] // n_heads

    kv_group = None
    if q_ext is not None and k_ext is not None and k_ext and q_ext % k_ext == 0:
        kv_group = q_ext // k_ext  # the q/k width ratio, known even without config.json
    elif q is not None and q.head_group is not None:
        kv_group = q.head_group
    elif q is not None and q.head_per_entry:
        kv_group = 1
    if n_heads is not None:
        if n_kv is None:
            n_kv = n_heads // kv_group if kv_group else n_heads
        if n_heads % n_kv:
            raise UnknownArchitectureError(f"{n_heads} attention heads cannot share {n_kv} key/value heads",
                                           hint="check num_key_value_heads in config.json")
        kv_group = n_heads // n_kv
        if head_dim is not None:
            for p, count in ((q, n_heads), (k, n_kv)):
                ext = _head_extent(p) if p is not None else None
                if ext is not None and ext != count * head_dim:
                    raise UnknownArchitectureError(
                        f"{p.tensor}: {ext} features do not hold {count} heads of dimension {head_dim}",
                        hint="config.json does not match the checkpoint: check num_attention_heads, "
                             "num_key_value_heads, head_dim")
    return Architecture(name, n_layers, n_heads, n_kv, head_dim, pieces, kv_group, how, family,
                        _missing_trunk(family, pieces, n_layers), unplaced)


def family_of_model(model: torch.nn.Module) -> Family | None:
    """The family of a live model (its config's class / model_type, else its parameter names); None when no
    family fits. Used to find LoRA targets and the final norm of a model that is already built."""
    config = getattr(model, "config", None)
    config = config.to_dict() if callable(getattr(config, "to_dict", None)) else None
    if config is not None:
        config = {**config, "architectures": [type(model).__name__]}
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        return recognise(shapes, config)[0]
    except UnknownArchitectureError:
        return None
