"""The gate's checks: each turns a run and its policy settings into one :class:`CheckResult`.

A check reports ``pass``, ``fail`` or ``skipped``. Skipped means the check could not run on this input (e.g. a
backbone needs >= 3 checkpoints, a resume probe needs to know its data) and is never counted as passed. The
exit-code rule (docs/gate.md): a *well-formed* input that breaks a check fails it (exit 1: a pickle that needs
unsafe globals, a NaN, a missing artifact, optimizer state that does not fit the weights); *bad input* (a file that
cannot be parsed: a truncated weight file, an unreadable or malformed optimizer state, a 0-byte scheduler.pt, a
missing shard) is raised as the CkptAuditError it is (exit 2, one line, nothing written), as by every other
command. Nothing here prints, and no pickle is ever executed (weights-only loading and content inspection only).

Each check is declared where it is defined (``@gate_check`` in ``file_checks.py`` and ``analyses_checks.py``, see
``gate/registry.py``); importing those modules, in this order, declares them in the order of ``gate --init``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ckptaudit.gate import file_checks  # noqa: F401 - declares provenance, safe_serialization, finite

# isort: split
from ckptaudit.gate import analyses_checks  # noqa: F401 - declares resume_probe, embedding_class, fisher_anisotropy, backbone
from ckptaudit.gate.registry import _CHECKS, Check

CHECKS: Mapping[str, Check] = MappingProxyType(_CHECKS)
