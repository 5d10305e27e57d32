"""Numbers from untrusted text: command-line options, policy files, JSON documents.

Every integer the tool keeps (steps, seeds, counts, sizes) ends up in an int64 (HDF5 datasets, torch generators,
numpy indices), so an integer outside int64 is refused where it is read, not where it overflows. Digits are ASCII
only: Python's ``int("²")`` raises and ``int("٣")`` is 3, and neither is what a user typed on purpose. Floats must
be finite and written in ASCII decimal notation.
"""

from __future__ import annotations

import math
import re

from ckptaudit.errors import CkptAuditError, UsageError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def is_int_text(text: str) -> bool:
    """True when ``text`` is an optionally signed run of ASCII digits (no spaces, no Unicode digits)."""
    return _INT_RE.fullmatch(text) is not None


def fits_int64(value: int) -> bool:
    return INT64_MIN <= int(value) <= INT64_MAX


def parse_int(text: str, what: str, *, minimum: int | None = None, maximum: int | None = None,
              error: type[CkptAuditError] = UsageError, hint: str | None = None) -> int:
    """``text`` as an int: ASCII digits with an optional sign, inside int64 and [minimum, maximum].

    ``what`` names the option or key in the message (``--seed``, ``policy.toml: checks.embedding_class.pairs``).
    """
    s = str(text).strip()
    if not is_int_text(s):
        raise error(f"{what}: {str(text)[:40]!r} is not an integer (ASCII digits 0-9)", hint)
    if len(s.lstrip("+-")) > 19:
        raise error(f"{what}: {s[:24]}... does not fit in 64 bits", hint)
    return check_int(int(s), what, minimum=minimum, maximum=maximum, error=error, hint=hint)


def check_int(value: int, what: str, *, minimum: int | None = None, maximum: int | None = None,
              error: type[CkptAuditError] = UsageError, hint: str | None = None) -> int:
    """``value`` when it fits int64 and [minimum, maximum]; ``error`` naming ``what`` otherwise."""
    if not fits_int64(value):
        shown = str(value) if value.bit_length() < 200 else f"an integer of {len(str(abs(value)))} digits"
        raise error(f"{what}: {shown} does not fit in 64 bits", hint)
    if minimum is not None and value < minimum:
        raise error(f"{what}: {value} is below the minimum {minimum}", hint)
    if maximum is not None and value > maximum:
        raise error(f"{what}: {value} is above the maximum {maximum}", hint)
    return int(value)


def parse_float(text: str, what: str, *, minimum: float | None = None, maximum: float | None = None,
                error: type[CkptAuditError] = UsageError, hint: str | None = None) -> float:
    """``text`` as a finite float in ASCII decimal notation (``1e-3``, ``.5``), inside [minimum, maximum]."""
    s = str(text).strip()
    if not _FLOAT_RE.fullmatch(s):
        raise error(f"{what}: {str(text)[:40]!r} is not a number", hint)
    value = float(s)
    if not math.isfinite(value):
        raise error(f"{what}: {s[:40]} is too large to be a finite number", hint)
    if minimum is not None and value < minimum:
        raise error(f"{what}: {value:g} is below the minimum {minimum:g}", hint)
    if maximum is not None and value > maximum:
        raise error(f"{what}: {value:g} is above the maximum {maximum:g}", hint)
    return value
