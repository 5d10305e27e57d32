"""Gate policies: a TOML file that names the checks to run and their thresholds.

A policy has one ``[gate]`` table (settings of the gate itself) and one ``[checks.<name>]`` table per check.
Only checks with a table are run; ``enabled = false`` keeps a table in the file without running it. Every key is
validated: an unknown key, a wrong type or an out-of-range value is a :class:`PolicyError` naming the key and the
line of the file, because a typo that silently disables a threshold would let a bad checkpoint through CI.

The keys of each check are declared with the check itself (``gate/registry.py``); this module validates a policy
against those declarations, and ``gate/reference.py`` renders ``--init``'s template and docs/gate.md from them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.errors import PolicyError
from ckptaudit.gate.checks import CHECKS
from ckptaudit.gate.registry import GATE_KEYS, TARGETS, Key  # noqa: F401 - TARGETS re-exported
from ckptaudit.io.numbers import fits_int64

try:  # Python >= 3.11
    import tomllib as _toml
except ImportError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ImportError:
        _toml = None  # type: ignore[assignment]


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


def _validate_table(path: str, text: str, where: tuple[str, ...], table: Any, keys: Mapping[str, Key]) -> dict[str, Any]:
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
        if name not in CHECKS:
            raise _error(path, text, ("checks", name), "unknown check", f"known checks: {', '.join(CHECKS)}")
        settings = _validate_table(path, text, ("checks", name), table, CHECKS[name].keys)
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
    check = CHECKS[name]
    needed = check.needs_one_of
    if needed and all(settings.get(k) is None for k in needed):
        raise _error(path, text, ("checks", name), f"no threshold set (set at least one of {', '.join(needed)})",
                     "a check without a threshold could never fail")  # fmt: skip
    for lo, hi in check.bounds:
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


def default_policy_text() -> str:
    """The commented default policy ``ckptaudit gate --init`` writes (it parses with :func:`parse_policy`)."""
    from ckptaudit.gate.reference import policy_template

    return policy_template()
