"""The outcome of a gate run: one :class:`CheckResult` per check, gathered in a :class:`GateResult`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ckptaudit.report.tree import TreeResult

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"


@dataclass(frozen=True)
class CheckResult(TreeResult):
    """Outcome of one check. ``value``/``threshold`` are short, JSON-able summaries; ``file`` the file concerned."""

    name: str
    status: str
    value: Any = None
    threshold: Any = None
    message: str = ""
    file: str | None = None
    details: dict = field(default_factory=dict, compare=False)

    def to_tree(self) -> dict:
        """One entry of ``checks``: name, status, value, threshold, message, file."""
        return {
            "name": self.name,
            "status": self.status,
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
            "file": self.file,
        }


@dataclass(frozen=True)
class GateResult(TreeResult):
    """All checks of one gate run, in policy order."""

    run: str
    policy: str
    target: str
    fail_on_skipped: bool
    checks: tuple[CheckResult, ...]

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == FAIL]

    @property
    def skipped(self) -> list[str]:
        return [c.name for c in self.checks if c.status == SKIPPED]

    @property
    def passed(self) -> bool:
        """True when no check failed (and none was skipped, when the policy says skipped fails)."""
        return not self.failed and not (self.fail_on_skipped and self.skipped)

    def summary(self) -> str:
        """One line: what failed (or was skipped under fail_on_skipped), for the exit message."""
        n = len(self.checks)
        parts = []
        if self.failed:
            parts.append(f"{len(self.failed)} of {n} checks failed: {', '.join(self.failed)}")
        if self.fail_on_skipped and self.skipped:
            parts.append(f"{len(self.skipped)} of {n} checks skipped with fail_on_skipped = true: {', '.join(self.skipped)}")
        if not parts:
            return f"{n - len(self.skipped)} of {n} checks passed" + (f", {len(self.skipped)} skipped" if self.skipped else "")
        return "; ".join(parts)

    JSON_ONLY = frozenset({"fail_on_skipped", "summary"})
    # The report holds the checks as columns: names, status, messages, values and thresholds (JSON text), files.
    HDF5_LAYOUT = {"checks": "_check_columns"}

    def to_tree(self) -> dict:
        """Keys (--json and /gate): passed, run, policy, target, fail_on_skipped, summary, checks (one CheckResult
        each)."""
        return {
            "passed": self.passed,
            "run": self.run,
            "policy": self.policy,
            "target": self.target,
            "fail_on_skipped": self.fail_on_skipped,
            "summary": self.summary(),
            "checks": list(self.checks),
        }

    @staticmethod
    def _check_columns(checks: list[CheckResult]) -> dict:
        return {
            "names": [c.name for c in checks],
            "status": [c.status for c in checks],
            "messages": [c.message for c in checks],
            "values": [json.dumps(c.value, default=str) for c in checks],
            "thresholds": [json.dumps(c.threshold, default=str) for c in checks],
            "files": [c.file or "" for c in checks],
        }
