"""CI gating of checkpoints: a TOML policy names checks; each passes, fails or is skipped (never silently passed).

Each check is declared once, with its keys, where it is defined (``registry.gate_check``); ``checks.CHECKS`` holds
them. ``load_policy`` / ``parse_policy`` validate a policy against them (errors name the key and its line),
``run_gate`` runs its checks on a discovered run, ``outputs`` writes JSON, JUnit XML and SARIF 2.1.0, and
``reference`` renders the ``--init`` template and docs/gate.md's key tables.
"""

from __future__ import annotations

from ckptaudit.gate.checks import CHECKS
from ckptaudit.gate.context import run_gate
from ckptaudit.gate.policy import Policy, default_policy_text, load_policy, parse_policy
from ckptaudit.gate.registry import Check, Key, gate_check
from ckptaudit.gate.result import CheckResult, GateResult

__all__ = [
    "CHECKS",
    "Check",
    "CheckResult",
    "GateResult",
    "Key",
    "Policy",
    "default_policy_text",
    "gate_check",
    "load_policy",
    "parse_policy",
    "run_gate",
]
