"""Gate policies: a TOML file that names the checks to run and their thresholds.

A policy has one ``[gate]`` table (settings of the gate itself) and one ``[checks.<name>]`` table per check.
Only checks with a table are run; ``enabled = false`` keeps a table in the file without running it. Every key is
validated: an unknown key, a wrong type or an out-of-range value is a :class:`PolicyError` naming the key and the
line of the file, because a typo that silently disables a threshold would let a bad checkpoint through CI.

The schema below is the single source of truth: the parser, ``--init``'s template and docs/gate.md follow it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.analyses.embeddings import MAX_PAIRS
from ckptaudit.errors import PolicyError
from ckptaudit.io.numbers import fits_int64

try:  # Python >= 3.11
    import tomllib as _toml
except ImportError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ImportError:
        _toml = None  # type: ignore[assignment]

TARGETS = ("last", "all")
ARTIFACTS = ("optimizer", "scheduler", "trainer_state", "lr_history", "rng_state")
CHECK_NAMES = (
    "provenance",
    "safe_serialization",
    "finite",
    "resume_probe",
    "embedding_class",
    "fisher_anisotropy",
    "backbone",
)


@dataclass(frozen=True)
class Key:
    """One allowed key: its type ("bool", "int", "float", "str", "list[str]"), default, and constraints.

    ``default=None`` with ``optional=True`` means "no bound": the key may be left out. ``choices`` restricts a str
    or the items of a list[str]; ``minimum``/``maximum``/``positive`` bound numbers. Every integer must fit int64.
    """

    type: str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    optional: bool = False


GATE_KEYS: dict[str, Key] = {
    "target": Key("str", "last", "which checkpoints of a run the per-checkpoint checks look at", choices=TARGETS),
    "fail_on_skipped": Key("bool", False, "a check that could not run fails the gate instead of being reported"),
}

_ENABLED = Key("bool", True, "run this check (a table with enabled = false is kept but not run)")

CHECK_KEYS: dict[str, dict[str, Key]] = {
    "provenance": {
        "enabled": _ENABLED,
        "require": Key(
            "list[str]",
            ["optimizer", "scheduler", "trainer_state", "rng_state"],
            "Level-2 artifacts every gated checkpoint must carry",
            choices=ARTIFACTS,
        ),
        "check_shapes": Key(
            "bool", True, "the optimizer state must map to parameter names that exist in the weights with the same shapes"
        ),
    },
    "safe_serialization": {
        "enabled": _ENABLED,
        "allow_files": Key("list[str]", [], "glob patterns (file name or path inside the checkpoint) exempt from the check"),
    },
    "finite": {
        "enabled": _ENABLED,
        "weights": Key("bool", True, "scan every weight tensor for NaN/Inf"),
        "moments": Key("bool", True, "scan the optimizer moments (exp_avg, exp_avg_sq) for NaN/Inf"),
    },
    "resume_probe": {
        "enabled": _ENABLED,
        "lr_multiplier": Key("float", 1.0, "learning-rate multiplier of the probe", positive=True),
        "steps": Key("int", None, "optimizer steps of the probe (default: the analysis' own)", minimum=1, optional=True),
        "task": Key("str", None, "built-in task for the probe's data (default: the checkpoint's ckptaudit_task.json)",
                    optional=True),
    },
    "embedding_class": {
        "enabled": _ENABLED,
        "expected": Key("str", None, "class the input embedding must have", choices=("A", "B"), optional=True),
        "bulk_index_min": Key("float", None, "lowest allowed bulk_index (ks_exp - ks_gauss)", optional=True),
        "bulk_index_max": Key("float", None, "highest allowed bulk_index", optional=True),
        "pairs": Key("int", 200_000, "sampled pairs for the overlap statistics", minimum=2, maximum=MAX_PAIRS),
    },
    "fisher_anisotropy": {
        "enabled": _ENABLED,
        "min": Key("float", None, "lowest allowed Fisher anisotropy", optional=True),
        "max": Key("float", None, "highest allowed Fisher anisotropy", optional=True),
    },
    "backbone": {
        "enabled": _ENABLED,
        "rho1_min": Key("float", None, "lowest allowed trunk PC1 share rho_1", minimum=0.0, optional=True),
        "rho1_max": Key("float", None, "highest allowed trunk PC1 share rho_1", minimum=0.0, optional=True),
        "k95_min": Key("int", None, "lowest allowed trunk k95", minimum=1, optional=True),
        "k95_max": Key("int", None, "highest allowed trunk k95", minimum=1, optional=True),
    },
}

# Checks whose thresholds are all optional need at least one of these, or they could never fail.
_BOUND_KEYS = {
    "embedding_class": ("expected", "bulk_index_min", "bulk_index_max"),
    "fisher_anisotropy": ("min", "max"),
    "backbone": ("rho1_min", "rho1_max", "k95_min", "k95_max"),
}
_PAIRS = {
    "embedding_class": [("bulk_index_min", "bulk_index_max")],
    "fisher_anisotropy": [("min", "max")],
    "backbone": [("rho1_min", "rho1_max"), ("k95_min", "k95_max")],
}


@dataclass(frozen=True)
class Policy:
    """A validated policy. ``checks`` maps each enabled check, in file order, to its settings (defaults filled)."""

    path: str
    target: str
    fail_on_skipped: bool
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    disabled: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "gate": {"target": self.target, "fail_on_skipped": self.fail_on_skipped},
            "checks": self.checks,
            "disabled": list(self.disabled),
        }


# ------------------------------------------------------------------------------------------- locating keys

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(r"""^\s*((?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _split_dotted(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_\-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def key_line(text: str, dotted: Sequence[str]) -> int | None:
    """1-based line on which the key path ``dotted`` (e.g. ("checks", "finite", "moments")) is set or opened.

    TOML keeps no positions, so the file text is scanned: table headers set the current prefix and each
    ``key = value`` line adds its (possibly dotted) key. Falls back to the line of the nearest enclosing table,
    then to the first line that mentions the last key component (inline tables), else None.
    """
    want = tuple(dotted)
    prefix: tuple[str, ...] = ()
    best: tuple[int, int] | None = None  # (matched depth, line)
    for n, line in enumerate(text.splitlines(), start=1):
        h = _HEADER.match(line)
        if h:
            prefix = _split_dotted(h.group(1))
            full = prefix
        else:
            a = _ASSIGN.match(line)
            if not a:
                continue
            full = prefix + _split_dotted(a.group(1))
        if full == want:
            return n
        if len(full) < len(want) and want[: len(full)] == full and (best is None or len(full) > best[0]):
            best = (len(full), n)
    if best is not None and best[0] >= len(want) - 1:
        return best[1]
    last = want[-1] if want else ""
    for n, line in enumerate(text.splitlines(), start=1):
        if re.search(r"(?<![A-Za-z0-9_\-])" + re.escape(last) + r"\s*=", line):
            return n
    return best[1] if best is not None else None


def _error(path: str, text: str, dotted: Sequence[str], problem: str, hint: str | None = None) -> PolicyError:
    line = key_line(text, dotted)
    where = f"{path}, line {line}" if line is not None else path
    return PolicyError(f"{where}: {'.'.join(dotted)}: {problem}", hint)


# ------------------------------------------------------------------------------------------------ parsing


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _coerce(spec: Key, value: Any) -> tuple[Any, str | None]:
    """(value, problem): the value converted to the key's type, or a description of why it cannot be."""
    t = spec.type
    if t == "bool":
        if not isinstance(value, bool):
            return None, f"expected true or false, got {_type_name(value)} {value!r}"
        return value, None
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return None, f"expected an integer, got {_type_name(value)} {value!r}"
        if not fits_int64(value):
            return None, f"{value} does not fit in 64 bits"
    elif t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"expected a number, got {_type_name(value)} {value!r}"
        value = float(value)
        if not math.isfinite(value):
            return None, f"expected a finite number, got {value!r}"
    elif t == "str":
        if not isinstance(value, str):
            return None, f"expected a string, got {_type_name(value)} {value!r}"
        if spec.choices is not None and value not in spec.choices:
            return None, f"{value!r} is not one of {', '.join(repr(c) for c in spec.choices)}"
        return value, None
    elif t == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, f"expected an array of strings, got {_type_name(value)} {value!r}"
        if spec.choices is not None:
            bad = [v for v in value if v not in spec.choices]
            if bad:
                return None, f"{', '.join(repr(b) for b in bad)} not among {', '.join(repr(c) for c in spec.choices)}"
        return list(value), None
    if spec.positive and value <= 0:
        return None, f"must be > 0, got {value!r}"
    if spec.minimum is not None and value < spec.minimum:
        return None, f"must be >= {spec.minimum:g}, got {value!r}"
    if spec.maximum is not None and value > spec.maximum:
        return None, f"must be <= {spec.maximum:g}, got {value!r}"
    return value, None


def _validate_table(path: str, text: str, where: tuple[str, ...], table: Any, keys: dict[str, Key]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise _error(path, text, where, f"expected a table, got {_type_name(table)}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in keys:
            raise _error(path, text, where + (key,), "unknown key", f"known keys: {', '.join(keys)}")
        coerced, problem = _coerce(keys[key], value)
        if problem is not None:
            raise _error(path, text, where + (key,), problem)
        out[key] = coerced
    for key, spec in keys.items():
        out.setdefault(key, list(spec.default) if isinstance(spec.default, list) else spec.default)
    return out


def parse_policy(text: str, path: str = "<policy>") -> Policy:
    """Parse and validate policy TOML ``text`` (``path`` only names the file in messages)."""
    if _toml is None:  # pragma: no cover - Python 3.10 without tomli
        raise PolicyError(f"{path}: reading TOML needs Python >= 3.11 or the 'tomli' package", "pip install tomli")
    try:
        doc = _toml.loads(text)
    except _toml.TOMLDecodeError as e:
        # tomllib's message ends in "(at line N, column M)": keep it, it is the position the user needs.
        raise PolicyError(f"{path}: invalid TOML: {e}", "fix the syntax (see docs/gate.md)") from None
    for key in doc:
        if key not in ("gate", "checks"):
            raise _error(path, text, (key,), "unknown top-level key", "a policy has a [gate] table and [checks.<name>] tables")
    gate = _validate_table(path, text, ("gate",), doc.get("gate", {}), GATE_KEYS)
    checks_doc = doc.get("checks", {})
    if not isinstance(checks_doc, dict):
        raise _error(path, text, ("checks",), f"expected tables [checks.<name>], got {_type_name(checks_doc)}")
    checks: dict[str, dict[str, Any]] = {}
    disabled: list[str] = []
    for name, table in checks_doc.items():
        if name not in CHECK_KEYS:
            raise _error(path, text, ("checks", name), "unknown check", f"known checks: {', '.join(CHECK_NAMES)}")
        settings = _validate_table(path, text, ("checks", name), table, CHECK_KEYS[name])
        if not settings.pop("enabled"):
            disabled.append(name)
            continue
        _check_bounds(path, text, name, settings)
        checks[name] = settings
    if not checks:
        raise PolicyError(
            f"{path}: the policy enables no checks",
            "add a [checks.<name>] table, e.g. [checks.provenance]; `ckptaudit gate --init` writes a full policy",
        )
    return Policy(path=path, target=gate["target"], fail_on_skipped=gate["fail_on_skipped"], checks=checks,
                  disabled=tuple(disabled))  # fmt: skip


def _check_bounds(path: str, text: str, name: str, settings: dict[str, Any]) -> None:
    """A bounds check needs at least one bound, and a lower bound may not exceed its upper bound."""
    needed = _BOUND_KEYS.get(name)
    if needed and all(settings.get(k) is None for k in needed):
        raise _error(path, text, ("checks", name), f"no threshold set (set at least one of {', '.join(needed)})",
                     "a check without a threshold could never fail")  # fmt: skip
    for lo, hi in _PAIRS.get(name, []):
        if settings.get(lo) is not None and settings.get(hi) is not None and settings[lo] > settings[hi]:
            raise _error(path, text, ("checks", name, lo), f"{lo} = {settings[lo]!r} exceeds {hi} = {settings[hi]!r}")


def load_policy(path: Path | str) -> Policy:
    """Read and validate the policy file at ``path``. Missing/unreadable files and bad content raise PolicyError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{p}: policy file not found", "create one with `ckptaudit gate --init ckptaudit-policy.toml`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{p}: cannot read the policy file ({e})") from None
    return parse_policy(text, str(p))


# ------------------------------------------------------------------------------------------------ template

DEFAULT_POLICY = """\
# ckptaudit gate policy (docs/gate.md has every key).
# `ckptaudit gate PATH --policy THIS_FILE` exits 0 when every enabled check passes, 1 when one fails,
# 2 when the input or this file is bad. Unknown keys and wrong types are errors, never ignored.

[gate]
# Which checkpoints of a run the per-checkpoint checks look at: "last" (the release) or "all".
target = "last"
# A check that cannot run here (analysis not available, too few checkpoints) is reported as skipped, never
# as passed. Set to true to make any skipped check fail the gate.
fail_on_skipped = false

[checks.provenance]
# Paper 000 section 6: weights without their training state are not a complete artifact.
enabled = true
# Any of "optimizer", "scheduler", "trainer_state", "lr_history", "rng_state".
require = ["optimizer", "scheduler", "trainer_state", "rng_state"]
# The optimizer moments must map to parameter names that exist in the weights with the same shapes.
check_shapes = true

[checks.safe_serialization]
# Every file must be safe to load (judged by content, never run; docs/security.md has the rule): data formats,
# or pickles that load weights-only, with at most numpy's array globals allow-listed.
enabled = true
# Glob patterns exempt from the check. The Trainer always writes training_args.bin, a pickled TrainingArguments
# that needs transformers' classes (needs-allow-listed-globals): ckptaudit reads it only as plain data, through
# stand-ins, but torch.load would have to trust those classes. Remove it to insist on none.
allow_files = {_exempt}

[checks.finite]
# No NaN/Inf in any weight tensor or optimizer moment (streamed tensor by tensor).
enabled = true
weights = true
moments = true

[checks.resume_probe]
# Resuming from these weights with a RESET optimizer must not collapse (trains; slow on large models).
enabled = false
lr_multiplier = 1.0
# Optimizer steps of the probe (default: the analysis' own, 50).
# steps = 50
# Built-in task whose data the probe trains on (default: the one recorded in the checkpoint).
# task = "modadd"

[checks.embedding_class]
# Bulk class of the input-embedding overlaps: "A" (dense Gaussian) or "B" (sparse exponential).
enabled = false
expected = "B"
# bulk_index_min = -1.0
# bulk_index_max = 1.0
pairs = 200000

[checks.fisher_anisotropy]
enabled = false
# min = 1.0
max = 1000.0

[checks.backbone]
# Drift-matrix SVD of the trajectory (needs >= 3 checkpoints): share of the trunk's first direction and the
# number of directions holding 95% of the drift.
enabled = false
rho1_min = 0.5
# rho1_max = 1.0
# k95_min = 1
k95_max = 10
"""


def default_policy_text() -> str:
    """The commented default policy ``ckptaudit gate --init`` writes (it parses with :func:`parse_policy`)."""
    import json

    from ckptaudit.io.safety import DEFAULT_EXEMPT_FILES

    return DEFAULT_POLICY.replace("{_exempt}", json.dumps(list(DEFAULT_EXEMPT_FILES)))
