"""The gate's checks: each turns a run and its policy settings into one :class:`CheckResult`.

A check reports ``pass``, ``fail`` or ``skipped``. Skipped means the check could not run here (its analysis is not
available in this version, or the input does not allow it, e.g. a backbone needs >= 3 checkpoints) and is never
counted as passed. The exit-code rule (docs/gate.md): a *well-formed* input that breaks a check fails it (exit 1:
a pickle that needs unsafe globals, a NaN, a missing artifact, optimizer state that does not fit the weights);
*bad input* (a file that cannot be parsed: a truncated weight file, an unreadable or malformed optimizer state, a
0-byte scheduler.pt, a missing shard) is raised as the CkptAuditError it is (exit 2, one line, nothing written),
as by every other command. Nothing here prints, and no pickle is ever executed (weights-only loading and content
inspection only).
"""

from __future__ import annotations

from collections.abc import Callable

from ckptaudit.gate.analyses_checks import (  # noqa: F401 - _bounds re-exported
    _bounds,
    check_backbone,
    check_embedding_class,
    check_fisher_anisotropy,
    check_resume_probe,
)
from ckptaudit.gate.context import BAD_INPUT, CHECK_FAILURES, GateContext, run_gate  # noqa: F401 - re-exported
from ckptaudit.gate.file_checks import check_finite, check_provenance, check_safe_serialization
from ckptaudit.gate.result import FAIL, PASS, SKIPPED, CheckResult, GateResult  # noqa: F401 - re-exported

DESCRIPTIONS = {
    "provenance": "Level-2 training state (optimizer moments, scheduler, trainer state, RNG state) is present "
    "and the optimizer state fits the weights (same parameter names and shapes).",
    "safe_serialization": "Every file is safetensors/GGUF/text or a pickle that loads weights-only; "
    "a pickle that needs arbitrary globals is refused without being run.",
    "finite": "No NaN or Inf in any weight tensor or optimizer moment.",
    "resume_probe": "Resuming with a reset optimizer state at the configured learning-rate multiplier does not collapse.",
    "embedding_class": "The input embedding's overlap bulk has the expected class / bulk_index bounds.",
    "fisher_anisotropy": "The Fisher anisotropy lies within the policy bounds.",
    "backbone": "The trajectory's trunk backbone (PC1 share rho_1, k95) lies within the policy bounds.",
}


CHECKS: dict[str, Callable[[GateContext, dict], CheckResult]] = {
    "provenance": check_provenance,
    "safe_serialization": check_safe_serialization,
    "finite": check_finite,
    "resume_probe": check_resume_probe,
    "embedding_class": check_embedding_class,
    "fisher_anisotropy": check_fisher_anisotropy,
    "backbone": check_backbone,
}
