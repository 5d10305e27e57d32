"""The gate's policy reference, rendered from the check declarations: ``gate --init``'s template and the key tables
of docs/gate.md.

``python -m ckptaudit.gate.reference docs/gate.md`` rewrites the part of the file between the two marker comments
(``make man`` runs it); with ``--check`` it exits 1 when that part is stale (``make lint`` and the tests run it).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptaudit.gate.checks import CHECKS
from ckptaudit.gate.registry import GATE_KEYS, Check, Key

BEGIN = ("<!-- policy reference: rendered from the check declarations (ckptaudit/gate/*_checks.py) by `make man`; "
         "edit those, not this part -->")
END = "<!-- end of the rendered policy reference -->"

_HEADER = """\
# ckptaudit gate policy (docs/gate.md has every key).
# `ckptaudit gate PATH --policy THIS_FILE` exits 0 when every enabled check passes, 1 when one fails,
# 2 when the input or this file is bad. Unknown keys and wrong types are errors, never ignored.
# Only checks with a table run; enabled = false keeps a table without running it.
"""


def _help(key: Key) -> str:
    """A key's meaning with the names of the per-checkpoint checks filled in (the [gate] target key)."""
    targets = ", ".join(name for name, c in CHECKS.items() if c.scope == "target")
    return key.help.replace("{target_checks}", targets)


def toml_value(value: Any) -> str:
    """``value`` (bool, int, float, str or list of str) as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {type(value).__name__}")


# --------------------------------------------------------------------------------------------- --init template


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, width=108, break_on_hyphens=False)]


def _template_key(name: str, key: Key, value: Any, set_it: bool) -> list[str]:
    text = _help(key)
    if key.choices is not None:
        text += f" {'One' if key.type == 'str' else 'Any'} of {', '.join(json.dumps(c) for c in key.choices)}."
    if key.default_text is not None:
        text += f" Default: {key.default_text.replace('`', '')}."
    lines = _comment(text)
    if set_it:
        lines.append(f"{name} = {toml_value(value)}")
    elif value is not None:
        lines.append(f"# {name} = {toml_value(value)}")
    return lines


def _template_table(header: str, keys: Mapping[str, Key], init: Mapping[str, Any], intro: str = "") -> list[str]:
    lines = [f"[{header}]", *(_comment(intro) if intro else [])]
    for name, key in keys.items():
        if name == "enabled":
            lines.append(f"enabled = {toml_value(init['enabled'])}")
        elif name in init:
            lines += _template_key(name, key, init[name], True)
        elif key.default is not None:
            lines += _template_key(name, key, key.default, True)
        else:
            lines += _template_key(name, key, key.example, False)
    return lines


def policy_template() -> str:
    """The commented policy ``ckptaudit gate --init`` writes: every check's table with its keys and their
    meanings; the checks declared with ``init_enabled`` on, the others off."""
    parts = [_HEADER.rstrip("\n"), "", *_template_table("gate", GATE_KEYS, {})]
    for check in CHECKS.values():
        parts += ["", *_template_table(f"checks.{check.name}", check.keys,
                                       {"enabled": check.init_enabled, **check.init}, check.description)]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ docs/gate.md


def _number_bounds(key: Key) -> str:
    def num(x: float) -> str:
        return str(int(x)) if key.type == "int" else f"{x:g}"

    if key.minimum is not None and key.maximum is not None:
        return f" in [{num(key.minimum)}, {num(key.maximum)}]"
    if key.positive:
        return " > 0"
    if key.minimum is not None:
        return f" ≥ {num(key.minimum)}"
    if key.maximum is not None:
        return f" ≤ {num(key.maximum)}"
    return ""


def type_text(key: Key) -> str:
    """The docs' type column for ``key``."""
    if key.type_text is not None:
        return key.type_text
    if key.type in ("int", "float"):
        return key.type + _number_bounds(key)
    if key.type == "str":
        return " \\| ".join(f"`{json.dumps(c)}`" for c in key.choices) if key.choices else "string"
    if key.type == "list[str]":
        return "array of " + (", ".join(f"`{json.dumps(c)}`" for c in key.choices) if key.choices else "strings")
    return key.type


def default_text(key: Key) -> str:
    """The docs' default column for ``key``."""
    if key.default_text is not None:
        return key.default_text
    return "—" if key.default is None else f"`{toml_value(key.default)}`"


def _table(keys: Mapping[str, Key]) -> list[str]:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, key in keys.items():
        if name != "enabled":
            rows.append(f"| `{name}` | {type_text(key)} | {default_text(key)} | {_help(key)} |")
    return rows


def _paragraph(text: str) -> str:
    return "\n".join(textwrap.wrap(text, width=116, break_on_hyphens=False, break_long_words=False))


def _check_section(check: Check) -> list[str]:
    lines = [f"### `[checks.{check.name}]`", "", _paragraph(check.description)]
    if check.doc:
        lines += ["", _paragraph(check.doc)]
    lines += ["", *_table(check.keys)]
    notes = []
    if check.needs_one_of:
        notes.append(f"At least one of {', '.join(f'`{k}`' for k in check.needs_one_of)} is required.")
    for lo, hi in check.bounds:
        notes.append(f"`{lo}` may not exceed `{hi}`.")
    if check.value:
        notes.append(f"Value: {check.value}")
    if notes:
        lines += ["", _paragraph(" ".join(notes))]
    return lines


def policy_reference() -> str:
    """The markdown of docs/gate.md's key reference: the ``[gate]`` table, then one section per check."""
    lines = ["### `[gate]`", "", *_table(GATE_KEYS), "",
             f"Every check table also takes `enabled` (bool, default `{toml_value(True)}`)."]
    for check in CHECKS.values():
        lines += ["", *_check_section(check)]
    return "\n".join(lines) + "\n"


def render_into(text: str) -> str:
    """``text`` (docs/gate.md) with the part between the markers replaced by :func:`policy_reference`."""
    try:
        head, rest = text.split(BEGIN + "\n", 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"the policy reference markers are missing: {BEGIN!r} ... {END!r}") from None
    return f"{head}{BEGIN}\n\n{policy_reference()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file", type=Path, help="docs/gate.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the rendered part on disk is stale")
    args = ap.parse_args(argv)
    text = args.file.read_text(encoding="utf-8")
    new = render_into(text)
    if args.check:
        if new != text:
            print(f"{args.file}: the policy reference is out of date — run `make man`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.file.write_text(new, encoding="utf-8")
        print(f"rewrote the policy reference in {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
