"""Parameter roles (SPEC §0): every tensor of a checkpoint split into (block, role) pieces, per-head slices.

A :class:`Piece` is a part of one stored tensor that has one (block, role): a whole tensor, or one of Q/K/V of
a fused projection, or one attention head of a projection. It only describes *where* the values lie (an
optional reshape ``view`` of the stored tensor, then basic indexing), so ``take`` returns a view and nothing
is copied. Pieces are frozen, hashable and picklable, so they travel to worker processes.

:func:`resolve_architecture` maps tensor names (and shapes) to pieces using the registry in
``architectures.py``, the checkpoint's ``config.json`` (head counts), and an optional user role map.
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

from ckptaudit.errors import CorruptFileError, InputNotFoundError, UnknownArchitectureError, UsageError
from ckptaudit.io.architectures import KNOWN_NAMES, Rule, match_rule, recognise
from ckptaudit.io.jsonio import loads_bounded

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "mlp_in", "mlp_out", "embed", "pos", "norm", "head", "other")
TRUNK_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "mlp_in", "mlp_out")
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
    piece cannot be split per head.
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
           head_axis: int | None = None, head_per_entry: bool = False) -> Piece:
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
                 head_axis, head_per_entry)


# ---------------------------------------------------------------------------------------------------- role map


_LAYER_INDEX_RE = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class RoleRule:
    """One user rule: tensor names matching ``pattern`` (re.search) get ``role``; a named group ``block``
    gives the block index. ``head_axis``: axis of the weight along which heads lie in runs of head_dim
    (enables per-head slicing; q/k/v biases then use axis 0)."""

    pattern: str
    role: str
    head_axis: int | None = None


@dataclass(frozen=True)
class RoleMap:
    """A user role map: rules tried in order before the registry, and optional head counts."""

    rules: tuple[RoleRule, ...]
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    source: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping, source: str | None = None) -> RoleMap:
        """Validate ``{"roles": [{"pattern": ..., "role": ...}, ...], "n_heads": ...}`` into a RoleMap.

        The plain form ``{regex: role, ...}`` (at the top level, or as the ``roles`` table) is accepted too; its
        rules keep the file's order."""
        where = source or "role map"
        entries = data.get("roles") if isinstance(data, Mapping) else None
        if isinstance(data, Mapping) and entries is None and data and all(isinstance(v, str) for v in data.values()):
            entries = dict(data)  # the whole document is {regex: role}
        if isinstance(entries, Mapping) and all(isinstance(v, str) for v in entries.values()):
            entries = [{"pattern": k, "role": v} for k, v in entries.items()]
        if not isinstance(entries, list) or not entries:
            raise UsageError(f"{where}: expected a non-empty list 'roles' of {{pattern, role}} entries",
                             hint=_ROLE_MAP_EXAMPLE)
        rules = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or "pattern" not in entry or "role" not in entry:
                raise UsageError(f"{where}: roles[{i}] needs 'pattern' and 'role'", hint=_ROLE_MAP_EXAMPLE)
            pattern, role = str(entry["pattern"]), str(entry["role"])
            if role not in ROLES:
                raise UsageError(f"{where}: roles[{i}] has unknown role {role!r}", hint=f"use one of {ROLES}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise UsageError(f"{where}: roles[{i}] pattern {pattern!r} is not a valid regex ({e})") from None
            head_axis = _user_int(entry.get("head_axis"), f"{where}: roles[{i}].head_axis", minimum=None)
            rules.append(RoleRule(pattern, role, head_axis))
        extra = [_user_int(data.get(k), f"{where}: {k}", minimum=1) for k in ("n_heads", "n_kv_heads", "head_dim")]
        return cls(tuple(rules), *extra, source=source)


def _user_int(value: Any, what: str, minimum: int | None) -> int | None:
    """``value`` as an int (None stays None); UsageError naming ``what`` when it is not one, or below ``minimum``."""
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{what} must be an integer, got {value!r}", hint=_ROLE_MAP_EXAMPLE) from None
    if minimum is not None and number < minimum:
        raise UsageError(f"{what} must be at least {minimum}, got {number}", hint=_ROLE_MAP_EXAMPLE)
    return number


_ROLE_MAP_EXAMPLE = ('e.g. a TOML file with lines [[roles]] pattern = \'blocks\\.(?P<block>\\d+)\\.attn\\.wq\\.weight$\' '
                     'role = "q"; or JSON {"roles": [{"pattern": "...", "role": "q"}]}')


def load_role_map(path: str | Path) -> RoleMap:
    """Read a role map from a TOML or JSON file (recognised by content: JSON starts with '{').

    Format: ``{"roles": [{"pattern": regex, "role": one of ROLES, "head_axis": optional int}, ...],
    "n_heads": optional, "n_kv_heads": optional, "head_dim": optional}``. Rules are tried in order.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"role map {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"role map {path} is not UTF-8 text", hint=_ROLE_MAP_EXAMPLE) from None
    except OSError as e:
        raise UsageError(f"role map {path} cannot be read ({e.strerror or e})", hint=_ROLE_MAP_EXAMPLE) from None
    try:
        if text.lstrip().startswith("{"):
            data = loads_bounded(text, f"role map {path}", error=UsageError, hint=_ROLE_MAP_EXAMPLE)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise UsageError(f"role map {path} is neither valid JSON nor valid TOML: {e}", hint=_ROLE_MAP_EXAMPLE) from None
    return RoleMap.from_dict(data, source=str(path))


# ---------------------------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Architecture:
    """Every tensor of a checkpoint split into (block, role) pieces, plus the attention head layout.

    ``pieces`` cover each stored tensor exactly once. ``kv_group`` = n_heads // n_kv_heads (1 without
    grouped-query attention), known from shapes even when the head counts are not.
    """

    name: str
    n_layers: int
    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None
    pieces: tuple[Piece, ...]
    kv_group: int | None = None

    @property
    def unplaced_block_weights(self) -> tuple[str, ...]:
        """Matrices (2-D or more) that sit in a numbered layer (``.<n>.`` in the name) but got no role: in a
        recognised architecture these are modules the registry does not know (e.g. mixture-of-experts MLPs), left
        out of the trunk unless a --role-map places them."""
        return tuple(p.tensor for p in self.pieces
                     if p.role == "other" and len(p.tensor_shape) >= 2 and _LAYER_INDEX_RE.search(p.tensor))

    def select(self, roles: Iterable[str] | str = TRUNK_ROLES, blocks: Iterable[int] | None = None,
               include_bias: bool = False) -> list[Piece]:
        """Pieces with a role in ``roles`` (a role, a group name "G"/"S", or several roles) and a block in
        ``blocks`` (None = every block, and pieces without a block), biases only with ``include_bias``."""
        if isinstance(roles, str):
            roles = GROUPS.get(roles, (roles,))
        roles = set(roles)
        unknown = roles - set(ROLES)
        if unknown:
            raise UsageError(f"unknown role(s) {sorted(unknown)}", hint=f"use roles from {ROLES}")
        wanted = None if blocks is None else set(blocks)
        return [p for p in self.pieces
                if p.role in roles and (include_bias or not p.is_bias) and (wanted is None or p.block in wanted)]

    def tensor_pieces(self, tensor: str) -> list[Piece]:
        """The pieces of one stored tensor, in order."""
        return [p for p in self.pieces if p.tensor == tensor]

    def numel_by_role(self) -> dict[str, int]:
        """Scalars per role (every role of ROLES, zero when absent)."""
        out = dict.fromkeys(ROLES, 0)
        for p in self.pieces:
            out[p.role] += p.numel
        return out

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
                                 hint="give head_axis for this pattern in the role map")
            out.append(_head_slice(p, head, count, self.head_dim))
        return sorted(out, key=lambda p: p.is_bias)


def _head_slice(p: Piece, head: int, count: int, head_dim: int) -> Piece:
    """The part of piece ``p`` that belongs to ``head`` (one of ``count`` heads of ``head_dim`` features)."""
    axis = p.head_axis
    sels = {s[0]: s for s in p.index}
    if p.head_per_entry:
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
                  tuple(sels[a] for a in sorted(sels)), head=head)


def _heads_unknown(arch: str, what: str) -> UnknownArchitectureError:
    return UnknownArchitectureError(
        f"{what} needs the number of attention heads, which is unknown for this {arch} checkpoint",
        hint="give the checkpoint's config.json (num_attention_heads / n_head) or n_heads in the role map")


# --------------------------------------------------------------------------------------------------- resolve


def _config_dims(config: Any) -> dict[str, int | None]:
    """n_heads, n_kv_heads, head_dim, hidden from a config.json dict (or a transformers config object)."""
    if config is None:
        return {"n_heads": None, "n_kv_heads": None, "head_dim": None, "hidden": None}
    if not isinstance(config, Mapping):
        if not callable(getattr(config, "to_dict", None)):
            raise CorruptFileError(f"config.json must hold a JSON object, got {type(config).__name__}",
                                   hint="re-save the config (model.config.save_pretrained(dir))")
        config = config.to_dict()
    if not any(k in config for k in ("num_attention_heads", "n_head")) and isinstance(config.get("text_config"),
                                                                                      Mapping):
        config = config["text_config"]  # multimodal wrappers keep the language model's dims here

    def first(*keys, positive=False):
        for k in keys:
            value = config.get(k)
            if value is not None:
                try:
                    number = int(value)
                except (TypeError, ValueError, OverflowError):
                    raise CorruptFileError(f"config.json: {k!r} must be an integer, got {value!r}",
                                           hint="fix config.json, or re-save it (model.config.save_pretrained(dir))"
                                           ) from None
                if positive and number < 1:
                    raise CorruptFileError(f"config.json: {k!r} must be at least 1, got {number}",
                                           hint="fix the head count in config.json")
                return number
        return None

    return {"n_heads": first("num_attention_heads", "n_head", "n_heads", "num_heads", positive=True),
            "n_kv_heads": first("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
                                positive=True),
            "head_dim": first("head_dim", "attention_head_size"),
            "hidden": first("hidden_size", "n_embd", "d_model", "dim")}


def _pieces_of_rule(name: str, shape: tuple[int, ...], rule: Rule, m: re.Match,
                    dims: dict[str, int | None]) -> list[Piece]:
    """Pieces of one stored tensor matched by a registry rule."""
    block = int(m.group("block")) if "block" in m.re.groupindex and m.group("block") is not None else None
    kind = m.group("kind") if "kind" in m.re.groupindex else None
    is_bias = kind == "bias" if kind is not None else (name.endswith("bias") and len(shape) == 1)
    if rule.fused == "gpt2_qkv":
        # Conv1D: Q | K | V along the last axis for both weight [d, 3d] and bias [3d].
        axis = len(shape) - 1
        if shape[axis] % 3:
            raise UnknownArchitectureError(f"{name}: fused Q|K|V axis of size {shape[axis]} is not divisible by 3")
        d = shape[axis] // 3
        return [_piece(name, block, role, is_bias, shape, index=((axis, i * d, (i + 1) * d),), head_axis=axis)
                for i, role in enumerate(("q", "k", "v"))]
    if rule.fused == "neox_qkv":
        n = dims["n_heads"]
        if n is None:
            raise UnknownArchitectureError(
                f"{name}: the fused GPT-NeoX query_key_value interleaves heads, so splitting it into Q/K/V needs "
                f"the number of attention heads", hint="give the checkpoint's config.json (num_attention_heads)")
        if shape[0] % (3 * n):
            raise UnknownArchitectureError(f"{name}: {shape[0]} rows do not hold Q/K/V of {n} heads",
                                           hint="check num_attention_heads in config.json")
        view = (n, 3, shape[0] // (3 * n), *shape[1:])
        return [_piece(name, block, role, is_bias, shape, view=view, index=((1, i),), head_axis=0,
                       head_per_entry=True) for i, role in enumerate(("q", "k", "v"))]
    head_axis = rule.bias_head_axis if is_bias else rule.weight_head_axis
    return [_piece(name, block, rule.role, is_bias, shape, head_axis=head_axis)]


def _pieces_of_user_rule(name: str, shape: tuple[int, ...], rule: RoleRule, m: re.Match) -> list[Piece]:
    block = m.groupdict().get("block")
    is_bias = name.endswith("bias") and len(shape) == 1
    head_axis = None
    if rule.head_axis is not None and rule.role in ATTENTION_ROLES:
        # Biases of q/k/v are one run per head; the output bias of o is shared by all heads.
        head_axis = (0 if rule.role != "o" else None) if is_bias else rule.head_axis
    return [_piece(name, None if block is None else int(block), rule.role, is_bias, shape, head_axis=head_axis)]


def _coerce_role_map(role_map: Any) -> RoleMap | None:
    if role_map is None or isinstance(role_map, RoleMap):
        return role_map
    if isinstance(role_map, (str, Path)):
        return load_role_map(role_map)
    if isinstance(role_map, Mapping):
        return RoleMap.from_dict(role_map)
    raise TypeError(f"role_map must be a RoleMap, a path or a dict, not {type(role_map).__name__}")


def _head_extent(p: Piece) -> int | None:
    """Features along the head axis of a run-laid-out piece (None for other layouts)."""
    if p.head_axis is None or p.head_per_entry:
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
        f"cannot place {len(unplaced)} of {total} tensors in any known architecture ({KNOWN_NAMES}): {shown}",
        hint=f"pass --role-map FILE mapping tensor names to roles {list(ROLES)}, e.g. {example}")


def resolve_architecture(shapes: Mapping[str, tuple[int, ...]], config: Any = None,
                         role_map: RoleMap | str | Path | Mapping | None = None) -> Architecture:
    """Split every tensor of a checkpoint into (block, role) pieces.

    ``shapes``: tensor name -> stored shape (e.g. from TensorSource.shape, or a state dict's shapes).
    ``config``: the checkpoint's config.json as a dict (head counts: needed for per-head slicing, and to
    split GPT-NeoX's fused Q/K/V). ``role_map``: user rules (a RoleMap, a path, or a dict), tried before the
    registry. Tensors inside a recognised architecture that no rule names get role "other"; when no
    architecture is recognised, tensors that no user rule names raise UnknownArchitectureError.
    """
    shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
    user = _coerce_role_map(role_map)
    dims = _config_dims(config)
    if user is not None:  # explicit user values win over config.json
        for key in ("n_heads", "n_kv_heads", "head_dim"):
            if getattr(user, key) is not None:
                dims[key] = getattr(user, key)

    user_rules = [(re.compile(r.pattern), r) for r in (user.rules if user else ())]
    by_name: dict[str, list[Piece]] = {}
    rest = []
    for name, shape in shapes.items():
        for pattern, rule in user_rules:
            m = pattern.search(name)
            if m is not None:
                by_name[name] = _pieces_of_user_rule(name, shape, rule, m)
                break
        else:
            rest.append(name)

    spec = recognise(rest)
    if spec is None and rest:
        raise _unknown_error(rest, len(shapes))
    for name in rest:
        hit = match_rule(spec, name)
        if hit is None:  # a buffer or extra module inside a known architecture
            by_name[name] = [_piece(name, None, "other", False, shapes[name])]
        else:
            by_name[name] = _pieces_of_rule(name, shapes[name], hit[0], hit[1], dims)
    pieces = tuple(p for name in shapes for p in by_name[name])
    name = spec.name if spec is not None else "custom"
    return _finish(name, pieces, dims)


def _finish(name: str, pieces: tuple[Piece, ...], dims: dict[str, int | None]) -> Architecture:
    """Derive head_dim / n_kv_heads / kv_group from the config and the shapes, checking they agree."""
    blocks = [p.block for p in pieces if p.block is not None]
    n_layers = max(blocks) + 1 if blocks else 0
    n_heads, n_kv, head_dim = dims["n_heads"], dims["n_kv_heads"], dims["head_dim"]

    def first_weight(role):
        return next((p for p in pieces if p.role == role and not p.is_bias and p.head_axis is not None), None)

    q, k = first_weight("q"), first_weight("k")
    if q is not None and q.head_per_entry:  # GPT-NeoX: the view is [n_heads, 3, head_dim, ...]
        head_dim = head_dim or q.view[2]
    q_ext, k_ext = (_head_extent(q) if q else None), (_head_extent(k) if k else None)
    if head_dim is None and n_heads is not None:
        if q_ext is not None:
            head_dim = q_ext // n_heads
        elif dims["hidden"] is not None:
            head_dim = dims["hidden"] // n_heads

    kv_group = None
    if q_ext is not None and k_ext is not None and k_ext and q_ext % k_ext == 0:
        kv_group = q_ext // k_ext  # the q/k width ratio, known even without config.json
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
    return Architecture(name, n_layers, n_heads, n_kv, head_dim, pieces, kv_group)
