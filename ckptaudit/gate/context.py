"""What the checks of one gate run share (:class:`GateContext`), and the loop that runs them (:func:`run_gate`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptaudit.errors import (
    CkptAuditError,
    CorruptFileError,
    InputNotFoundError,
    OptimizerStateError,
    UnsafePickleError,
    UsageError,
)
from ckptaudit.gate.result import GateResult
from ckptaudit.io.types import RunLike, StoredCheckpoint

if TYPE_CHECKING:
    from ckptaudit.gate.policy import Policy

# Errors of well-formed input that a check fails on (exit 1); every other CkptAuditError is bad input (exit 2).
CHECK_FAILURES = (UnsafePickleError, OptimizerStateError)
# Bad input that the analysis-based checks pass on instead of reporting their check as skipped.
BAD_INPUT = (CorruptFileError, InputNotFoundError)


class GateContext:
    """What the checks share: the run, the checkpoints to gate, and per-checkpoint caches (inspection, optimizer)."""

    def __init__(self, run: RunLike[StoredCheckpoint], policy: Policy, device: str = "cpu", seed: int = 0):
        self.run = run
        self.policy = policy
        self.device = device
        self.seed = seed
        cks = list(run.checkpoints)
        self.targets = cks if policy.target == "all" else cks[-1:]
        self._info: dict[str, Any] = {}
        self._opt: dict[str, Any] = {}
        self._backbone: Any = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def info(self, ckpt: StoredCheckpoint) -> Any:
        """analyses.inspect.inspect_checkpoint (with file safety) for ``ckpt``, computed once."""
        key = str(ckpt.path)
        if key not in self._info:
            from ckptaudit.analyses.inspect import inspect_checkpoint

            self._info[key] = inspect_checkpoint(ckpt, check_files=True)[0]
        return self._info[key]

    def optimizer(self, ckpt: StoredCheckpoint) -> Any:
        """io.optimizer.load_optimizer_state(ckpt), loaded once for provenance and finite (a refusal is re-raised)."""
        key = str(ckpt.path)
        if key not in self._opt:
            from ckptaudit.io.optimizer import load_optimizer_state

            # One entry only: memory stays flat in the number of checkpoints with target = "all".
            self._opt.clear()
            try:
                self._opt[key] = load_optimizer_state(ckpt)
            except CkptAuditError as e:
                self._opt[key] = e
        value = self._opt[key]
        if isinstance(value, CkptAuditError):
            raise value
        return value

    def backbone(self, run_backbone: Callable[..., Any]) -> tuple[Any, Path | None]:
        """(report, trunk vectors file) of ``run_backbone`` over the whole run, computed once per gate run.

        The backbone and fisher_anisotropy checks share it. The vectors file (v_b and PC2, what the Fisher
        measurement reads) is written only when fisher_anisotropy is enabled, into a temporary directory that
        :meth:`close` removes; it is None otherwise. A refusal of the analysis is cached and re-raised.
        """
        if self._backbone is None:
            n = len(self.run.checkpoints)
            vectors = None
            try:
                if n < 3:
                    raise UsageError(f"the backbone direction needs >= 3 checkpoints of a run, got {n}")
                if "fisher_anisotropy" in self.policy.checks:
                    self._tmp = tempfile.TemporaryDirectory(prefix="ckptaudit-gate-")
                    vectors = Path(self._tmp.name) / "backbone.safetensors"
                report = run_backbone(self.run, device=self.device, save_vectors=vectors, top_k_vectors=2)
                self._backbone = (report, vectors)
            except CkptAuditError as e:
                self._backbone = e
        if isinstance(self._backbone, CkptAuditError):
            raise self._backbone
        return self._backbone

    def close(self) -> None:
        """Remove the gate run's temporary files (the backbone vectors)."""
        self._backbone = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _rel(path: Any, base: Any) -> str:
    try:
        return str(Path(path).relative_to(Path(base)))
    except ValueError:
        return str(path)


def _weight_file(ckpt: StoredCheckpoint) -> str:
    files = ckpt.weight_files
    return str(files[0]) if files else str(ckpt.path)


def _label(ckpt: StoredCheckpoint) -> str:
    return f"step {ckpt.step}"


def run_gate(run: RunLike[StoredCheckpoint], policy: Policy, device: str = "cpu", seed: int = 0,
             progress: Callable[[float], None] | None = None) -> GateResult:  # fmt: skip
    """Run every enabled check of ``policy`` on ``run`` (a discovered Run), in policy order."""
    from ckptaudit.gate.checks import CHECKS

    ctx = GateContext(run, policy, device=device, seed=seed)
    results = []
    try:
        for name, settings in policy.checks.items():
            results.append(CHECKS[name].run(ctx, settings))
            if progress is not None:
                progress(1)
    finally:
        ctx.close()
    return GateResult(run=str(run.path), policy=policy.path, target=policy.target,
                      fail_on_skipped=policy.fail_on_skipped, checks=tuple(results))  # fmt: skip
