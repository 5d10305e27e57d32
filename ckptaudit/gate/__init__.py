"""CI gating of checkpoints: a TOML policy names checks; each passes, fails or is skipped (never silently passed).

``load_policy`` / ``parse_policy`` validate a policy (errors name the key and its line), ``run_gate`` runs its
checks on a discovered run, and ``outputs`` writes JSON, JUnit XML and SARIF 2.1.0.
"""

from __future__ import annotations

from ckptaudit.gate.checks import CHECKS, CheckResult, GateResult, run_gate
from ckptaudit.gate.policy import CHECK_NAMES, Policy, default_policy_text, load_policy, parse_policy

__all__ = [
    "CHECKS",
    "CHECK_NAMES",
    "CheckResult",
    "GateResult",
    "Policy",
    "default_policy_text",
    "load_policy",
    "parse_policy",
    "run_gate",
]
