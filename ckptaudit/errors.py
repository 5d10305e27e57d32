"""One exception tree. Each class carries its exit code; messages name the file/tensor/token and the fix.

The CLI prints ``str(error)`` on one line (no traceback unless --debug or CKPTAUDIT_DEBUG=1) and exits
with ``error.exit_code``: 2 for bad input or usage, 1 for a failed gate.

Parameters: an analysis names a parameter by its Python name with a placeholder, ``$name`` (the parameter itself)
or ``$name=VALUE`` (the parameter with a value), in the message and the hint, and says which parameter the error
is about with ``param``::

    UsageError(f"$window={window}: need at least 2 rows", "give a smaller $window", param="window")

Each caller spells it its way (:meth:`CkptAuditError.render`): the command line as the command's option (``--window
5``, ``--window``; cli/app.py looks the option up in the command's parameters), the Python API (ckptaudit.api) as
the keyword (``window=5``, ``window=``). Without a caller's spelling (an analysis called directly) the default is the
option's usual spelling, ``--`` and the name with dashes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

# $name or $name=: a parameter's Python name (lower case), with "=" when a value follows.
_PLACEHOLDER = re.compile(r"\$([a-z][a-z0-9_]*)(=?)")

Spelling = Callable[[str, bool], str]


def option_spelling(name: str, with_value: bool) -> str:
    """The default spelling: ``--name-with-dashes`` (and a space before a value)."""
    flag = "--" + name.replace("_", "-")
    return flag + " " if with_value else flag


def matching_name(name: str, known: Iterable[str]) -> str | None:
    """The name in ``known`` that is ``name`` up to a plural ("s" / "es" added or "s" dropped: an analysis'
    ``switch`` is the API's ``switches``, its ``lr_mults`` the option ``--lr-mult``), or None."""
    known = set(known)
    return next((c for c in (name, name + "s", name + "es", name.removesuffix("s")) if c in known), None)


def keyword_spelling(name: str, with_value: bool) -> str:
    """The Python API's spelling: ``name=`` (the value, if any, follows directly)."""
    return name + "="


def spell(text: str | None, spelling: Spelling) -> str | None:
    """``text`` with every ``$name`` / ``$name=`` placeholder spelled by ``spelling(name, with_value)``."""
    if text is None:
        return None
    return _PLACEHOLDER.sub(lambda m: spelling(m.group(1), m.group(2) == "="), text)


class CkptAuditError(Exception):
    """Base of every error a user can cause. ``hint`` is the one-line fix appended to the message.

    ``param``: the Python name of the parameter the error is about (None: none); ``message`` and ``hint`` may
    name parameters as ``$name`` / ``$name=VALUE`` (module docstring). ``str(error)``, :attr:`message` and
    :attr:`hint` use :attr:`spelling` (set by the caller that knows how its parameters are written, default
    :func:`option_spelling`); :attr:`template` and :attr:`hint_template` keep the placeholders.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, *, param: str | None = None):
        self.template = message
        self.hint_template = hint
        self.param = param
        self.spelling: Spelling = option_spelling
        super().__init__(message if hint is None else f"{message} — {hint}")

    @property
    def message(self) -> str:
        return spell(self.template, self.spelling) or ""

    @message.setter
    def message(self, value: str) -> None:
        self.template = value

    @property
    def hint(self) -> str | None:
        return spell(self.hint_template, self.spelling)

    @hint.setter
    def hint(self, value: str | None) -> None:
        self.hint_template = value

    def render(self, spelling: Spelling | None = None) -> str:
        """The one-line text with parameters spelled by ``spelling`` (default: :attr:`spelling`)."""
        how = spelling or self.spelling
        message, hint = spell(self.template, how), spell(self.hint_template, how)
        return message if hint is None else f"{message} — {hint}"

    def __str__(self) -> str:
        return self.render()


class UsageError(CkptAuditError):
    """Bad command-line usage (conflicting or malformed options)."""


class InputNotFoundError(CkptAuditError):
    """A path given by the user does not exist."""


class LayoutError(CkptAuditError):
    """A run directory whose layout is not recognised, is empty, or has missing/ambiguous steps."""


class CorruptFileError(CkptAuditError):
    """A checkpoint file that cannot be parsed (truncated safetensors, bad header, bad JSON...)."""


class UnsafePickleError(CkptAuditError):
    """A pickle that needs globals outside the weights-only allow-list. Its code never runs."""


class UnknownArchitectureError(CkptAuditError):
    """Tensor names that no architecture in the registry (nor the user's role map) can place."""


class OptimizerStateError(CkptAuditError):
    """Optimizer state that cannot be mapped to parameter names exactly (refused rather than guessed)."""


class HubNotCachedError(CkptAuditError):
    """A hub id that is not in the local cache: ckptaudit never downloads."""


class DataError(CkptAuditError):
    """Evaluation/training data that is missing, empty or too small."""


class NonFiniteWeightsError(CkptAuditError):
    """Weights holding NaN or infinity (a diverged run): analyses of their geometry are undefined."""


class PolicyError(CkptAuditError):
    """A malformed gate policy file (names the key and the line)."""


class GateFailedError(CkptAuditError):
    """At least one gate check failed."""

    exit_code = 1
