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
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError, UnknownArchitectureError
from ckptaudit.io import architectures as fam
from ckptaudit.io.architectures import ROLES, TRUNK_ROLES, Family, Rule  # noqa: F401 - TRUNK_ROLES re-exported
from ckptaudit.io.layouts import split
from ckptaudit.io.pieces import (  # noqa: F401 - re-exported
    ATTENTION_ROLES,
    GROUPS,
    Architecture,
    Piece,
    Selection,
    _piece,
)

# ---------------------------------------------------------------------------------------------------- role map


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
