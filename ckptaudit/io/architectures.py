"""Architecture families as data: one TOML file per family under ``ckptaudit/architectures/``, one schema.

A family file says which ``config.json`` values it serves (``architectures`` class names, ``model_type``), where
the head counts live in the config, how projection matrices are stored (``orientation``), and how every tensor
name maps to a (block, role) piece: plain tensors, fused Q|K|V or gate|up tensors (a closed vocabulary of split
layouts, see ``FUSED_LAYOUTS``), stacked or numbered mixture-of-experts weights. It also names the LoRA target
modules of the family and the final norm that the slack probe hooks. ``roles.py`` turns a matched rule into
pieces; this module loads, validates and looks families up.

A user role map (``--role-map FILE``) is read by the same schema: a file with ``name`` adds a family (or
replaces the shipped family of that name), ``extends = "llama"`` inherits a family's fields and puts its own
rules first, and a file of rules alone is an overlay tried before the recognised family (the older form
``{regex: role}`` is accepted too). Every key is checked when a file is read; an unknown key, a wrong type or a
bad regex is an error naming the file and the key.

Patterns are regexes searched in the full tensor name. Three placeholders keep them short: ``{block}`` (the
layer index, a named group), ``{expert}`` (the expert index of a numbered expert module) and ``{param}``
(``.weight`` or ``.bias`` at the end of the name, in a group named ``kind``). Shipped patterns start with
``\\b`` so that any prefix (``transformer.``, Lightning's ``model.``, DDP's ``module.``, torch.compile's
``_orig_mod.``) still matches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ckptaudit.errors import InputNotFoundError, UnknownArchitectureError, UsageError

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "mlp_in", "mlp_out", "embed", "pos", "norm", "head", "other")
TRUNK_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "mlp_in", "mlp_out")

# Split layouts of fused tensors, along the output axis (see roles.py for the arithmetic of each):
FUSED_LAYOUTS: dict[str, tuple[str, ...]] = {
    "thirds": ("q", "k", "v"),              # equal thirds Q | K | V (GPT-2 Conv1D, nanoGPT Linear)
    "heads_interleaved": ("q", "k", "v"),   # per head [q_h, k_h, v_h] (GPT-NeoX / Pythia, Bloom)
    "grouped": ("q", "k", "v"),             # per kv group [q x n_heads/n_kv, k, v] (Falcon: GQA, MQA and MHA)
    "by_head_counts": ("q", "k", "v"),      # rows [n_heads*dh | n_kv*dh | n_kv*dh] (Phi-3 qkv_proj, OLMo att_proj)
    "halves": ("mlp_in", "mlp_in"),         # two equal halves, e.g. gate | up (Phi-3 gate_up_proj, MoE experts)
}
ORIENTATIONS = ("linear", "conv1d", "auto")

# Where a config.json keeps the dimensions, first present key wins (a family file may replace a list).
DEFAULT_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim", "attention_head_size"),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "n_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
}

_PLACEHOLDERS = {"{block}": r"(?P<block>\d+)", "{expert}": r"(?P<expert>\d+)",
                 "{param}": r"\.(?P<kind>weight|bias)$"}

SCHEMA_HINT = "see docs/architecture.md ('Architecture files') for the schema, or `ckptaudit architectures`"


# ------------------------------------------------------------------------------------------------ data classes


@dataclass(frozen=True)
class Rule:
    """One tensor-name rule of a family.

    ``role``: role of the whole tensor (None when ``fused``); ``fused``: a FUSED_LAYOUTS name, with ``parts`` the
    roles of its parts in storage order. ``heads``: where attention heads lie — "out" / "in" (the projection's
    output / input features; resolved by the family's orientation), an axis number, "none", or None (the
    default of the role: q/k/v along "out", o along "in", when the family states its orientation).
    ``experts``: the axis of stacked experts (one piece per expert). ``kind``: "weight" / "bias" for parameters
    stored without that suffix. ``signature``: whether a match is evidence for the family.
    """

    pattern: re.Pattern
    role: str | None
    fused: str | None = None
    parts: tuple[str, ...] = ()
    heads: str | int | None = None
    experts: int | None = None
    kind: str | None = None
    signature: bool = True
    text: str = ""  # the pattern as written in the file (placeholders unexpanded)


@dataclass(frozen=True)
class Probe:
    """Decides the orientation from one tensor: conv1d when its shape is [d, m*d], linear when [m*d, d]."""

    pattern: re.Pattern
    out_multiple: int


@dataclass(frozen=True)
class Family:
    """A validated architecture family (see the module docstring). ``source``: the file it was read from."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    source: str = ""
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    generic: bool = False
    orientation: str | None = None
    orientation_probe: Probe | None = None
    config_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ()
    lora_note: str = ""
    final_norm: tuple[str, ...] = ()
    trunk_roles: tuple[str, ...] = TRUNK_ROLES
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    extends: str | None = None

    def match(self, name: str) -> tuple[Rule, re.Match] | None:
        """The first rule whose pattern is found in ``name``, with its match."""
        for rule in self.rules:
            m = rule.pattern.search(name)
            if m is not None:
                return rule, m
        return None

    def keys_for(self, what: str) -> tuple[str, ...]:
        """The config.json keys holding ``what`` (n_heads, n_kv_heads, head_dim, hidden, n_layers)."""
        return tuple(self.config_keys.get(what, DEFAULT_CONFIG_KEYS.get(what, ())))

    def orientation_for(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        """"linear" or "conv1d" for this checkpoint (the probe decides "auto"); None when unstated. Raises
        UnknownArchitectureError when the probe tensor contradicts a fixed orientation or fits neither."""
        probe = self.orientation_probe
        if probe is None:
            return None if self.orientation == "auto" else self.orientation
        seen = probe_orientation(probe, shapes)
        if seen is None or self.orientation in (None, "auto"):
            return seen if seen is not None else (None if self.orientation == "auto" else self.orientation)
        if seen != self.orientation:
            raise UnknownArchitectureError(
                f"{self.name}: tensors matching {probe.pattern.pattern!r} are stored {seen}, not {self.orientation}",
                hint="the checkpoint is of another layout: check config.json, or give --role-map")
        return seen


def probe_orientation(probe: Probe, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """"conv1d" / "linear" from the first 2-D tensor matching the probe, None when none matches or fits."""
    for name, shape in shapes.items():
        if len(shape) == 2 and probe.pattern.search(name):
            a, b = shape
            if b == probe.out_multiple * a:
                return "conv1d"
            if a == probe.out_multiple * b:
                return "linear"
            return None
    return None


# ---------------------------------------------------------------------------------------------------- schema


class _Where:
    """The file and key path that a schema error names."""

    def __init__(self, source: str):
        self.source = source

    def error(self, key: str, message: str) -> UsageError:
        return UsageError(f"{self.source}: {key}: {message}", hint=SCHEMA_HINT)


_FAMILY_KEYS = {"name", "description", "extends", "architectures", "model_types", "generic", "orientation",
                "orientation_probe", "config", "lora_targets", "lora_note", "final_norm", "trunk_roles", "roles",
                "n_heads", "n_kv_heads", "head_dim"}
_RULE_KEYS = {"pattern", "role", "fused", "parts", "heads", "head_axis", "experts", "kind", "signature"}


def _str(where: _Where, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise where.error(key, f"must be a string, got {type(value).__name__}")
    return value


def _strs(where: _Where, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise where.error(key, "must be a list of strings")
    return tuple(value)


def _int(where: _Where, key: str, value: Any, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(key, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise where.error(key, f"must be at least {minimum}, got {value}")
    if value >= 2**31:
        raise where.error(key, f"is out of range ({value})")
    return value


def _bool(where: _Where, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise where.error(key, f"must be true or false, got {value!r}")
    return value


def compile_pattern(where: _Where, key: str, text: str) -> re.Pattern:
    """A rule pattern with its placeholders expanded, compiled (UsageError naming the key when invalid)."""
    body = text
    for token, regex in _PLACEHOLDERS.items():
        body = body.replace(token, regex)
    try:
        return re.compile(body)
    except re.error as e:
        raise where.error(key, f"pattern {text!r} is not a valid regex ({e})") from None


def _rule(where: _Where, i: int, entry: Any) -> Rule:
    key = f"roles[{i}]"
    if not isinstance(entry, Mapping):
        raise where.error(key, "must be a table with 'pattern' and 'role' (or 'fused')")
    unknown = sorted(set(entry) - _RULE_KEYS)
    if unknown:
        raise where.error(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_RULE_KEYS))})")
    if "pattern" not in entry:
        raise where.error(key, "needs 'pattern'")
    text = _str(where, f"{key}.pattern", entry["pattern"])
    pattern = compile_pattern(where, f"{key}.pattern", text)
    fused = entry.get("fused")
    role = entry.get("role")
    parts: tuple[str, ...] = ()
    if fused is not None:
        fused = _str(where, f"{key}.fused", fused)
        if fused not in FUSED_LAYOUTS:
            raise where.error(f"{key}.fused", f"unknown layout {fused!r} (known: {', '.join(FUSED_LAYOUTS)})")
        parts = _strs(where, f"{key}.parts", entry["parts"]) if "parts" in entry else FUSED_LAYOUTS[fused]
        if len(parts) != len(FUSED_LAYOUTS[fused]):
            raise where.error(f"{key}.parts", f"layout {fused!r} has {len(FUSED_LAYOUTS[fused])} parts")
        bad = [p for p in parts if p not in ROLES]
        if bad:
            raise where.error(f"{key}.parts", f"unknown role {bad[0]!r} (use one of {', '.join(ROLES)})")
        if role is not None:
            raise where.error(f"{key}.role", "give 'parts' for a fused tensor, not 'role'")
    else:
        if role is None:
            raise where.error(key, "needs 'role' (or 'fused')")
        role = _str(where, f"{key}.role", role)
        if role not in ROLES:
            raise where.error(f"{key}.role", f"unknown role {role!r} (use one of {', '.join(ROLES)})")
        if "parts" in entry:
            raise where.error(f"{key}.parts", "only a fused tensor has parts")
    heads: str | int | None = None
    if "head_axis" in entry:  # the older user-map spelling: an axis number
        heads = _int(where, f"{key}.head_axis", entry["head_axis"])
    if "heads" in entry:
        value = entry["heads"]
        if isinstance(value, str) and value in ("out", "in", "none"):
            heads = value
        elif isinstance(value, int) and not isinstance(value, bool):
            heads = _int(where, f"{key}.heads", value)
        else:
            raise where.error(f"{key}.heads", f"must be 'out', 'in', 'none' or an axis number, got {value!r}")
    experts = _int(where, f"{key}.experts", entry["experts"]) if "experts" in entry else None
    kind = entry.get("kind")
    if kind is not None and kind not in ("weight", "bias"):
        raise where.error(f"{key}.kind", f"must be 'weight' or 'bias', got {kind!r}")
    signature = _bool(where, f"{key}.signature", entry["signature"]) if "signature" in entry else True
    return Rule(pattern, role, fused, parts, heads, experts, kind, signature, text)


def family_from_dict(data: Any, source: str, registry: Mapping[str, Family] | None = None,
                     require_name: bool = True) -> Family:
    """Validate one family document (a parsed TOML/JSON file) into a Family.

    ``registry``: families that ``extends`` may name. ``require_name``: shipped files need a name; a user role
    map may be rules alone. The older user-map forms (``{regex: role}``, a ``[roles]`` table) are accepted.
    """
    where = _Where(source)
    if not isinstance(data, Mapping):
        raise where.error("document", "must be a table (TOML) or an object (JSON)")
    if data and "roles" not in data and all(isinstance(v, str) for v in data.values()) and "name" not in data:
        data = {"roles": dict(data)}  # the whole document is {regex: role}
    roles = data.get("roles")
    if isinstance(roles, Mapping) and all(isinstance(v, str) for v in roles.values()):
        data = {**data, "roles": [{"pattern": k, "role": v} for k, v in roles.items()]}
    unknown = sorted(set(data) - _FAMILY_KEYS)
    if unknown:
        raise where.error(unknown[0], f"unknown key (known: {', '.join(sorted(_FAMILY_KEYS))})")
    name = data.get("name")
    if name is None and require_name:
        raise where.error("name", "missing (every family file names its family)")
    if name is not None:
        name = _str(where, "name", name)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise where.error("name", f"{name!r} must be lower-case letters, digits and '_'")
    base: Family | None = None
    extends = data.get("extends")
    if extends is not None:
        extends = _str(where, "extends", extends)
        if registry is None or extends not in registry:
            known = ", ".join(sorted(registry or ()))
            raise where.error("extends", f"no family named {extends!r} (known: {known})")
        base = registry[extends]
    rules_in = data.get("roles", [])
    if not isinstance(rules_in, list):
        raise where.error("roles", "must be a list of rule tables ([[roles]] in TOML)")
    rules = tuple(_rule(where, i, e) for i, e in enumerate(rules_in))
    if not rules and base is None:
        raise where.error("roles", "needs at least one rule")
    kw: dict[str, Any] = {}
    if base is not None:
        kw = {f: getattr(base, f) for f in ("description", "architectures", "model_types", "orientation",
                                            "orientation_probe", "config_keys", "lora_targets", "lora_note",
                                            "final_norm", "trunk_roles", "n_heads", "n_kv_heads", "head_dim")}
        kw["architectures"], kw["model_types"] = (), ()  # a derived family serves its own config names
        rules = rules + base.rules
    for key in ("description", "lora_note"):
        if key in data:
            kw[key] = _str(where, key, data[key])
    for key in ("architectures", "model_types", "lora_targets", "final_norm"):
        if key in data:
            kw[key] = _strs(where, key, data[key])
    if "trunk_roles" in data:
        kw["trunk_roles"] = _strs(where, "trunk_roles", data["trunk_roles"])
        bad = [r for r in kw["trunk_roles"] if r not in TRUNK_ROLES]
        if bad:
            raise where.error("trunk_roles", f"{bad[0]!r} is not a trunk role ({', '.join(TRUNK_ROLES)})")
    if "orientation" in data:
        kw["orientation"] = _str(where, "orientation", data["orientation"])
        if kw["orientation"] not in ORIENTATIONS:
            raise where.error("orientation", f"must be one of {', '.join(ORIENTATIONS)}")
    if "orientation_probe" in data:
        probe = data["orientation_probe"]
        if not isinstance(probe, Mapping) or set(probe) != {"pattern", "out_multiple"}:
            raise where.error("orientation_probe", "must be a table with 'pattern' and 'out_multiple'")
        kw["orientation_probe"] = Probe(compile_pattern(where, "orientation_probe.pattern",
                                                        _str(where, "orientation_probe.pattern", probe["pattern"])),
                                        _int(where, "orientation_probe.out_multiple", probe["out_multiple"], 2))
    if kw.get("orientation") == "auto" and kw.get("orientation_probe") is None:
        raise where.error("orientation", "'auto' needs an orientation_probe")
    if "config" in data:
        cfg = data["config"]
        if not isinstance(cfg, Mapping):
            raise where.error("config", "must be a table of dimension -> list of config.json keys")
        bad = sorted(set(cfg) - set(DEFAULT_CONFIG_KEYS))
        if bad:
            raise where.error(f"config.{bad[0]}", f"unknown dimension (known: {', '.join(DEFAULT_CONFIG_KEYS)})")
        kw["config_keys"] = {**kw.get("config_keys", {}),
                             **{k: _strs(where, f"config.{k}", v) for k, v in cfg.items()}}
    if "generic" in data:
        kw["generic"] = _bool(where, "generic", data["generic"])
    for key in ("n_heads", "n_kv_heads", "head_dim"):
        if key in data:
            kw[key] = _int(where, key, data[key], minimum=1)
    return Family(name=name or (base.name if base is not None else "custom"), rules=rules, source=source,
                  extends=extends, **kw)


def parse_text(text: str, source: str) -> Any:
    """A family or role-map document: JSON when it starts with '{', TOML otherwise (UsageError when neither)."""
    try:
        if text.lstrip().startswith("{"):
            from ckptaudit.io.jsonio import loads_bounded

            return loads_bounded(text, source, error=UsageError, hint=SCHEMA_HINT)
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(text)
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply to be a role map", hint=SCHEMA_HINT) from None
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise UsageError(f"{source} is neither valid JSON nor valid TOML: {e}", hint=SCHEMA_HINT) from None


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (InputNotFoundError / UsageError naming it otherwise)."""
    if not path.is_file():
        raise InputNotFoundError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text", hint=SCHEMA_HINT) from None
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be read ({e.strerror or e})", hint=SCHEMA_HINT) from None


# -------------------------------------------------------------------------------------------------- registry


def shipped_folder() -> Any:
    """The folder of the shipped family files (package data)."""
    return resources.files("ckptaudit") / "architectures"


def _shipped_files() -> list[tuple[str, str, str]]:
    """(file name, text, where it lives) of every shipped family file."""
    folder = shipped_folder()
    return sorted((entry.name, entry.read_text(encoding="utf-8"), str(entry))
                  for entry in folder.iterdir() if entry.name.endswith(".toml"))


@lru_cache(maxsize=1)
def shipped_families() -> dict[str, Family]:
    """Every shipped family by name, read and validated once. A family that ``extends`` another is read after
    it (files are ordered by their ``extends`` chain, then by name)."""
    docs = {}
    for fname, text, source in _shipped_files():
        doc = parse_text(text, source)
        name = doc.get("name") if isinstance(doc, Mapping) else None
        if not isinstance(name, str) or fname != f"{name}.toml":
            raise _Where(source).error("name", f"must equal the file name without .toml, got {name!r}")
        docs[name] = (doc, source)
    out: dict[str, Family] = {}
    pending = dict(docs)
    while pending:
        ready = [n for n, (doc, _) in pending.items() if doc.get("extends") in (None, *out)]
        if not ready:
            n, (_, source) = next(iter(pending.items()))
            raise _Where(source).error("extends", "names a family that is missing or extends it back")
        for n in sorted(ready):
            doc, source = pending.pop(n)
            out[n] = family_from_dict(doc, source, out)
    return out


def families_with(user: Family | None) -> dict[str, Family]:
    """The shipped families, with a named user family added (or replacing the shipped one of that name)."""
    fams = dict(shipped_families())
    if user is not None and user.source and user.name != "custom":
        fams[user.name] = user
    return fams


def config_names(config: Mapping | None) -> tuple[tuple[str, ...], str | None]:
    """(``architectures``, ``model_type``) of a config.json dict, looking inside ``text_config`` for the
    language model of a multimodal wrapper when the top level names no attention heads."""
    if not isinstance(config, Mapping):
        return (), None
    archs = config.get("architectures")
    archs = tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ()
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    return archs, model_type


def by_config(config: Mapping | None, families: Mapping[str, Family]) -> tuple[list[Family], str]:
    """Families that ``config`` names: by its ``architectures`` class names first, then by ``model_type``.
    Returns (candidates, how) where ``how`` says which key matched ("" when none did)."""
    archs, model_type = config_names(config)
    for arch in archs:
        hits = [f for f in families.values() if arch in f.architectures]
        if hits:
            return hits, f"config.json architectures {arch!r}"
    if model_type is not None:
        hits = [f for f in families.values() if model_type in f.model_types]
        if hits:
            return hits, f"config.json model_type {model_type!r}"
    text = config.get("text_config") if isinstance(config, Mapping) else None
    if isinstance(text, Mapping):
        hits, how = by_config(text, families)
        if hits:
            return hits, how.replace("config.json", "config.json text_config")
    return [], ""


def signature_score(family: Family, names: Sequence[str]) -> int:
    """How many of ``names`` a signature rule of ``family`` matches."""
    count = 0
    for name in names:
        hit = family.match(name)
        count += hit is not None and hit[0].signature
    return count


def known_names() -> str:
    """The shipped family names, for messages."""
    return ", ".join(sorted(shipped_families()))


def describe(families: Mapping[str, Family]) -> list[dict[str, Any]]:
    """One row per family for ``ckptaudit architectures``: name, config names, extends, LoRA targets, final norm,
    fused layouts used, whether it has experts, and the file it lives in."""
    rows = []
    for fam in sorted(families.values(), key=lambda f: f.name):
        rows.append({"name": fam.name, "description": fam.description, "architectures": list(fam.architectures),
                     "model_types": list(fam.model_types), "extends": fam.extends, "orientation": fam.orientation,
                     "fused": sorted({r.fused for r in fam.rules if r.fused}),
                     "experts": any(r.experts is not None or "{expert}" in r.text for r in fam.rules),
                     "lora_targets": list(fam.lora_targets), "final_norm": list(fam.final_norm),
                     "file": fam.source})
    return rows
