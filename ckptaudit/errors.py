"""One exception tree. Each class carries its exit code; messages name the file/tensor/token and the fix.

The CLI prints ``str(error)`` on one line (no traceback unless --debug or CKPTAUDIT_DEBUG=1) and exits
with ``error.exit_code``: 2 for bad input or usage, 1 for a failed gate.
"""

from __future__ import annotations


class CkptAuditError(Exception):
    """Base of every error a user can cause. ``hint`` is the one-line fix appended to the message."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} — {hint}")


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
