"""Bounded JSON reading: the one reader for every JSON document ckptaudit takes from disk.

config.json, trainer_state.json, sharded indexes, safetensors headers, task files, contexts files and role maps
all come from the checkpoint or the user and are untrusted. Python's ``json`` module alone accepts what would
later break the tool: 50,000 nested brackets (a RecursionError, in the parser or in the first recursive walk of
the result), integers with thousands of digits, a document of gigabytes, the same key twice (the last silently
wins). ``loads_bounded`` / ``read_json`` refuse each of these with a :class:`CorruptFileError` (or the error class
the caller names) naming the file and what is wrong:

- size: at most ``max_bytes`` (default :data:`MAX_JSON_BYTES`);
- nesting: at most ``max_depth`` levels of arrays/objects (default :data:`MAX_JSON_DEPTH`), checked without
  recursion;
- integers must fit int64 (every step, count and size the tool stores is an int64 in its reports); with
  ``wide_ints=True`` an integer of up to :data:`MAX_WIDE_INT_DIGITS` digits is read as a float instead (the file
  check of a folder, where a tokenizer_config.json holds transformers' ``model_max_length`` of 10**30 and is a
  well-formed file);
- object keys are unique.

``NaN`` and ``Infinity`` are accepted as Python's ``json`` writes them (the Trainer logs a NaN loss that way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckptaudit.errors import CkptAuditError, CorruptFileError, InputNotFoundError
from ckptaudit.io.numbers import INT64_MAX, INT64_MIN

MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_JSON_DEPTH = 100
MAX_WIDE_INT_DIGITS = 64

_FIX = "re-save or restore the file"


class _Refused(ValueError):
    """Raised from the parser hooks; turned into the caller's error class with the file name."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # int64 has at most 19 digits: refuse before converting thousands of them
        raise _Refused(f"integer {text[:24]}{'...' if len(text) > 24 else ''} does not fit in 64 bits")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise _Refused(f"integer {text} does not fit in 64 bits")
    return value


def _wide_int(text: str) -> int | float:
    if len(text.lstrip("-")) > MAX_WIDE_INT_DIGITS:
        raise _Refused(f"integer {text[:24]}... has more than {MAX_WIDE_INT_DIGITS} digits")
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else float(value)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {key[:80]!r} appears twice in one object")
        out[key] = value
    return out


def _depth_ok(obj: Any, limit: int) -> bool:
    """True when ``obj`` nests at most ``limit`` containers deep (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        cur, d = stack.pop()
        if isinstance(cur, dict):
            children = cur.values()
        elif isinstance(cur, list):
            children = cur
        else:
            continue
        if d > limit:
            return False
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return True


def loads_bounded(text: str | bytes, where: str, *, max_depth: int = MAX_JSON_DEPTH,
                  error: type[CkptAuditError] = CorruptFileError, hint: str = _FIX, wide_ints: bool = False) -> Any:
    """Parse the JSON document ``text`` under the limits of the module docstring. ``where`` names the file (and
    line) in messages; ``error`` is the class raised (CorruptFileError by default), with ``hint`` as its fix;
    ``wide_ints``: integers beyond int64 become floats instead of an error."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text (byte {exc.start})", hint) from None
    try:
        obj = json.loads(text, parse_int=_wide_int if wide_ints else _int, object_pairs_hook=_pairs)
    except _Refused as exc:
        raise error(f"{where}: {exc}", hint) from None
    except RecursionError:
        raise error(f"{where}: JSON nested more than {max_depth} levels deep", hint) from None
    except ValueError as exc:
        msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
        pos = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise error(f"{where}: invalid JSON: {msg}{pos}", hint) from None
    if not _depth_ok(obj, max_depth):
        raise error(f"{where}: JSON nested more than {max_depth} levels deep", hint)
    return obj


def read_json(path: Path | str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              expect: type | None = dict, error: type[CkptAuditError] = CorruptFileError, hint: str = _FIX) -> Any:
    """Read and parse the JSON file at ``path`` under the module's limits.

    ``expect``: the type the top level must have (dict by default; None accepts any). Missing file ->
    InputNotFoundError; unreadable, too large, invalid, too deep, a non-int64 integer, a repeated key or the wrong
    top-level type -> ``error`` naming the file.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise InputNotFoundError(f"{p}: no such file", hint="check the path") from None
    except OSError as exc:
        raise error(f"{p}: cannot be read ({exc.strerror or exc})", hint) from None
    if size > max_bytes:
        raise error(f"{p}: {size} bytes, more than the {max_bytes} a JSON file may have here", hint)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise error(f"{p}: cannot be read ({exc.strerror or exc})", hint) from None
    obj = loads_bounded(raw, str(p), max_depth=max_depth, error=error, hint=hint)
    if expect is not None and not isinstance(obj, expect):
        want = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise error(f"{p}: expected {want}, found {_json_type(obj)}", hint)
    return obj


def _json_type(obj: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(obj), type(obj).__name__)
