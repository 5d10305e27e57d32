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

import fnmatch
import importlib
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.errors import (
    CkptAuditError,
    CorruptFileError,
    InputNotFoundError,
    OptimizerStateError,
    UnsafePickleError,
    UsageError,
)
from ckptaudit.gate.policy import Policy

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"

# Errors of well-formed input that a check fails on (exit 1); every other CkptAuditError is bad input (exit 2).
CHECK_FAILURES = (UnsafePickleError, OptimizerStateError)
# Bad input that the analysis-based checks pass on instead of reporting their check as skipped.
BAD_INPUT = (CorruptFileError, InputNotFoundError)

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


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check. ``value``/``threshold`` are short, JSON-able summaries; ``file`` the file concerned."""

    name: str
    status: str
    value: Any = None
    threshold: Any = None
    message: str = ""
    file: str | None = None
    details: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
            "file": self.file,
        }


@dataclass(frozen=True)
class GateResult:
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

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "run": self.run,
            "policy": self.policy,
            "target": self.target,
            "fail_on_skipped": self.fail_on_skipped,
            "summary": self.summary(),
            "checks": [c.to_json() for c in self.checks],
        }

    def to_hdf5_tree(self) -> dict:
        import json

        return {
            "passed": self.passed,
            "run": self.run,
            "policy": self.policy,
            "target": self.target,
            "names": [c.name for c in self.checks],
            "status": [c.status for c in self.checks],
            "messages": [c.message for c in self.checks],
            "values": [json.dumps(c.value, default=str) for c in self.checks],
            "thresholds": [json.dumps(c.threshold, default=str) for c in self.checks],
            "files": [c.file or "" for c in self.checks],
        }


class GateContext:
    """What the checks share: the run, the checkpoints to gate, and per-checkpoint caches (inspection, optimizer)."""

    def __init__(self, run: Any, policy: Policy, device: str = "cpu", seed: int = 0):
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

    def info(self, ckpt: Any) -> Any:
        """provenance.inspect_checkpoint (with file safety) for ``ckpt``, computed once."""
        key = str(ckpt.path)
        if key not in self._info:
            from ckptaudit.analyses.provenance import inspect_checkpoint

            self._info[key] = inspect_checkpoint(ckpt, check_files=True)[0]
        return self._info[key]

    def optimizer(self, ckpt: Any) -> Any:
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


def _weight_file(ckpt: Any) -> str:
    files = tuple(getattr(ckpt, "weight_files", ()) or ())
    return str(files[0]) if files else str(ckpt.path)


def _label(ckpt: Any) -> str:
    return f"step {ckpt.step}"


# -------------------------------------------------------------------------------------------- provenance


def check_provenance(ctx: GateContext, settings: dict) -> CheckResult:
    """Required Level-2 artifacts present in every gated checkpoint, and the optimizer state fits the weights."""
    require = list(settings["require"])
    threshold = {"require": require, "check_shapes": settings["check_shapes"]}
    problems: list[tuple[str, str]] = []  # (message, file)
    for ckpt in ctx.targets:
        info = ctx.info(ckpt)  # a file that cannot be parsed is bad input: raised, exit 2
        _refuse_unreadable_artifacts(ckpt, info)
        missing = [a for a in require if not info.artifacts.get(a, False)]
        if missing:
            problems.append((f"{_label(ckpt)}: missing {', '.join(missing)}", _weight_file(ckpt)))
        if settings["check_shapes"] and info.artifacts.get("optimizer"):
            problem = _optimizer_fits_weights(ctx, ckpt)
            if problem is not None:
                problems.append((f"{_label(ckpt)}: {problem[0]}", problem[1]))
    n = len(ctx.targets)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return CheckResult("provenance", FAIL, f"{len(problems)} problem(s) in {n} checkpoint(s)", threshold,
                           problems[0][0] + more, problems[0][1], {"problems": [p for p, _ in problems]})  # fmt: skip
    what = ", ".join(require) if require else "no artifacts required"
    shapes = "; optimizer state fits the weights" if settings["check_shapes"] else ""
    return CheckResult("provenance", PASS, f"complete in {n} checkpoint(s)", threshold, f"{what} present{shapes}",
                       _weight_file(ctx.targets[-1]))  # fmt: skip


def _refuse_unreadable_artifacts(ckpt: Any, info: Any) -> None:
    """A Level-2 file that is there but cannot be read (0 bytes, truncated, not the pickle its name says) is bad
    input, not a missing artifact: CorruptFileError naming it."""
    wanted = [getattr(ckpt, "optimizer_file", None), getattr(ckpt, "scheduler_file", None),
              *getattr(ckpt, "rng_files", ())]
    by_path = {Path(f.path): f for f in info.files}
    for f in wanted:
        if f is None or Path(f).is_dir():
            continue
        verdict = by_path.get(Path(f))
        if verdict is not None and not verdict.loadable:
            raise CorruptFileError(f"{f}: unreadable ({verdict.detail})",
                                   "restore the file from the training run, or remove it and gate without it")


def _optimizer_fits_weights(ctx: GateContext, ckpt: Any) -> tuple[str, str] | None:
    """(problem, file) when the optimizer state cannot be named exactly or does not match the weights' shapes.

    load_optimizer_state refuses (naming the parameter) when its index -> name mapping does not fit the model the
    config describes; the weights themselves are then compared name by name, so weights that disagree with both
    the config and the optimizer are caught too.
    """
    opt_file = str(getattr(ckpt, "optimizer_file", None) or ckpt.path)
    try:
        opt = ctx.optimizer(ckpt)
    except CHECK_FAILURES as e:
        return f"optimizer state does not fit: {e.message}", opt_file
    try:
        with ckpt.tensors() as src:
            names = set(src.keys())
            for name, ps in opt.state.items():
                if name not in names:
                    return f"optimizer state names parameter {name!r}, which the weights do not contain", opt_file
                shape = tuple(src.shape(name))
                for key in ("exp_avg", "exp_avg_sq"):
                    t = getattr(ps, key)
                    if t is not None and tuple(t.shape) != shape:
                        return (f"{name}: optimizer {key} shape {tuple(t.shape)} != weight shape {shape}", opt_file)
    except UnsafePickleError as e:
        return f"weights cannot be loaded weights-only: {e.message}", _weight_file(ckpt)
    return None


# ------------------------------------------------------------------------------------------ safe formats


def _exempt(path: str, ckpt_path: Any, patterns: Sequence[str]) -> bool:
    p = Path(path)
    rel = _rel(p, ckpt_path)
    return any(fnmatch.fnmatch(p.name, pat) or fnmatch.fnmatch(rel, pat) for pat in patterns)


def check_safe_serialization(ctx: GateContext, settings: dict) -> CheckResult:
    """Every file of the gated checkpoints safe per provenance.file_safety (content-based, nothing executed)."""
    allow = list(settings["allow_files"])
    threshold = {"unsafe_files": 0, "allow_files": allow}
    unsafe: list[Any] = []
    exempted: list[str] = []
    n_files = 0
    for ckpt in ctx.targets:
        info = ctx.info(ckpt)
        for f in info.files:
            n_files += 1
            if f.safe:
                continue
            if _exempt(f.path, ckpt.path, allow):
                exempted.append(Path(f.path).name)
            elif not f.loadable:  # cannot be judged: bad input, not a failed check
                raise CorruptFileError(f"{f.path}: unreadable ({f.detail})",
                                       "restore or remove the file, or exempt it with allow_files in the policy")
            else:
                unsafe.append(f)
    note = f" ({len(exempted)} exempted by allow_files: {', '.join(sorted(set(exempted)))})" if exempted else ""
    if unsafe:
        first = unsafe[0]
        more = f" (+{len(unsafe) - 1} more unsafe file(s))" if len(unsafe) > 1 else ""
        return CheckResult("safe_serialization", FAIL, len(unsafe), threshold,
                           f"{first.path}: {first.detail or 'not safe to load'}{more}{note}", first.path,
                           {"unsafe": [f.path for f in unsafe]})  # fmt: skip
    return CheckResult("safe_serialization", PASS, 0, threshold, f"{n_files} file(s) safe to load{note}",
                       _weight_file(ctx.targets[-1]))  # fmt: skip


# --------------------------------------------------------------------------------------------- finite


def _nonfinite(t: Any) -> tuple[int, int]:
    """(number of NaN, number of Inf) in tensor ``t``; 0, 0 for integer tensors."""
    import torch

    if not (t.is_floating_point() or t.is_complex()):
        return 0, 0
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return 0, 0
    n_nan = int(torch.isnan(t).sum())
    return n_nan, int((~finite).sum()) - n_nan


def _scan_weights(ckpt: Any) -> tuple[list[tuple[str, str, int, int]], int]:
    """Non-finite weight tensors of ``ckpt`` as (tensor, file, n_nan, n_inf), and the number of tensors read."""
    bad = []
    with ckpt.tensors() as src:
        names = list(src.keys())
        files = [str(f) for f in src.files()]
        for name in names:  # one tensor at a time: memory stays flat in model size
            n_nan, n_inf = _nonfinite(src.get(name))
            if n_nan or n_inf:
                where = files[0] if len(files) == 1 else _file_of(src, name, files)
                bad.append((name, where, n_nan, n_inf))
    return bad, len(names)


def _file_of(src: Any, name: str, files: list[str]) -> str:
    shard = getattr(src, "_shard", None)
    if callable(shard):
        try:
            return str(shard(name).files()[0])
        except Exception:  # noqa: BLE001 - the index is enough to name the checkpoint
            pass
    return files[0] if files else str(src.path)


def _scan_moments(ctx: GateContext, ckpt: Any) -> tuple[list[tuple[str, str, int, int]], int]:
    """Non-finite optimizer moments of ``ckpt`` named by parameter (by index when names cannot be mapped)."""
    import torch

    path = str(getattr(ckpt, "optimizer_file", None) or ckpt.path)
    try:
        entries = [
            (f"{name}.{key}", getattr(ps, key))
            for name, ps in ctx.optimizer(ckpt).state.items()
            for key in ("exp_avg", "exp_avg_sq")
        ]
    except OptimizerStateError:
        # Names unknown (provenance reports why): still scan, naming moments by their index in the file.
        from ckptaudit.io.tensors import safe_torch_load

        raw = safe_torch_load(path)
        state = raw.get("state", {}) if isinstance(raw, dict) else {}
        entries = [(f"state[{i}].{k}", v) for i, e in state.items() if isinstance(e, dict) for k, v in e.items()]
    bad, n = [], 0
    for label, t in entries:
        if isinstance(t, torch.Tensor):
            n += 1
            n_nan, n_inf = _nonfinite(t)
            if n_nan or n_inf:
                bad.append((label, path, n_nan, n_inf))
    return bad, n


def check_finite(ctx: GateContext, settings: dict) -> CheckResult:
    """No NaN/Inf in weights and optimizer moments of the gated checkpoints; names the first offending tensor."""
    threshold = {"nonfinite_tensors": 0, "weights": settings["weights"], "moments": settings["moments"]}
    bad: list[tuple[str, str, int, int, Any]] = []
    n_tensors = n_moments = 0
    no_moments: list[int] = []
    for ckpt in ctx.targets:
        try:
            if settings["weights"]:
                found, k = _scan_weights(ckpt)
                n_tensors += k
                bad += [(*b, ckpt) for b in found]
            if settings["moments"]:
                if getattr(ckpt, "optimizer_file", None) is None and getattr(ckpt, "layout", "") != "lightning":
                    no_moments.append(ckpt.step)
                else:
                    found, k = _scan_moments(ctx, ckpt)
                    n_moments += k
                    bad += [(*b, ckpt) for b in found]
        except UnsafePickleError as e:  # well-formed but not loadable weights-only: the check fails
            return CheckResult("finite", FAIL, None, threshold, f"{_label(ckpt)}: cannot be read: {e.message}", str(ckpt.path))
    if bad:
        name, where, n_nan, n_inf, ckpt = bad[0]
        more = f" (+{len(bad) - 1} more non-finite tensor(s))" if len(bad) > 1 else ""
        return CheckResult("finite", FAIL, len(bad), threshold,
                           f"{name} ({_label(ckpt)}, {Path(where).name}) has {n_nan} NaN and {n_inf} Inf values{more}",
                           where, {"tensors": [b[0] for b in bad]})  # fmt: skip
    msg = f"{n_tensors} weight tensor(s) and {n_moments} moment tensor(s) finite"
    if no_moments:
        msg += f"; no optimizer state to scan at step(s) {', '.join(map(str, no_moments))}"
    return CheckResult("finite", PASS, 0, threshold, msg, _weight_file(ctx.targets[-1]))


# ----------------------------------------------------------------------------------- analyses-based checks


def _optional(module: str, *names: str) -> tuple[Any, str | None]:
    """(first of ``names`` found in ``module``, None) or (None, reason it is not available)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        why = "" if getattr(e, "name", None) == module else f" ({e})"  # a broken dependency is worth naming
        return None, f"{module} is not available in this version of ckptaudit{why}"
    for n in names:
        fn = getattr(mod, n, None)
        if callable(fn):
            return fn, None
    return None, f"{module} provides none of {', '.join(names)}"


def _bounds(value: float, lo: float | None, hi: float | None) -> str | None:
    """Why ``value`` violates [lo, hi] (a NaN or infinite value always does), or None."""
    if not math.isfinite(value):
        return f"{value} is not finite"
    if lo is not None and value < lo:
        return f"{value:.4g} < min {lo:g}"
    if hi is not None and value > hi:
        return f"{value:.4g} > max {hi:g}"
    return None


def _range(lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"[{lo:g}, {hi:g}]"
    return f">= {lo:g}" if lo is not None else f"<= {hi:g}"


def check_embedding_class(ctx: GateContext, settings: dict) -> CheckResult:
    """Class A/B and bulk_index bounds of the input embedding of each gated checkpoint (analyses.embeddings)."""
    matrices, reason = _optional("ckptaudit.analyses.embeddings", "embedding_matrices")
    stats, reason2 = _optional("ckptaudit.analyses.embeddings", "overlap_stats")
    lo, hi, expected = settings["bulk_index_min"], settings["bulk_index_max"], settings["expected"]
    threshold: dict[str, Any] = {}
    if expected is not None:
        threshold["class"] = expected
    if lo is not None or hi is not None:
        threshold["bulk_index"] = _range(lo, hi)
    if matrices is None or stats is None:
        return CheckResult("embedding_class", SKIPPED, None, threshold, reason or reason2)
    values = []
    for ckpt in ctx.targets:
        try:
            mats = matrices(ckpt.path)  # the LM head is read only to tell whether it is tied; it is not classified
            res = stats(mats["embed"], pairs=settings["pairs"], seed=ctx.seed, device=ctx.device,
                        tied_head="head" not in mats)  # fmt: skip
        except BAD_INPUT:
            raise
        except CkptAuditError as e:
            return CheckResult("embedding_class", SKIPPED, None, threshold, f"{_label(ckpt)}: {e.message}", str(ckpt.path))
        bulk = float(res.bulk_index)
        value = {"class": res.bulk_class, "bulk_index": round(bulk, 6) if math.isfinite(bulk) else None}
        values.append(value)
        problems = []
        if expected is not None and res.bulk_class != expected:
            problems.append(f"class {res.bulk_class} != expected {expected}")
        out = _bounds(bulk, lo, hi)
        if out:
            problems.append(f"bulk_index {out}")
        if problems:
            return CheckResult("embedding_class", FAIL, value, threshold, f"{_label(ckpt)}: {'; '.join(problems)}",
                               _weight_file(ckpt))  # fmt: skip
    return CheckResult("embedding_class", PASS, values[-1], threshold,
                       f"class {values[-1]['class']}, bulk_index {values[-1]['bulk_index']:.4g}", _weight_file(ctx.targets[-1]))  # fmt: skip


def check_fisher_anisotropy(ctx: GateContext, settings: dict) -> CheckResult:
    """Fisher anisotropy within [min, max] via ckptaudit.analyses.fisher, along the backbone the gate computed once
    for the run (shared with the backbone check); skipped while either analysis is absent."""
    threshold = _range(settings["min"], settings["max"])
    fn, reason = _optional("ckptaudit.analyses.fisher", "fisher_anisotropy")
    run_backbone, reason2 = _optional("ckptaudit.analyses.backbone", "run_backbone")
    if fn is None or run_backbone is None:
        return CheckResult("fisher_anisotropy", SKIPPED, None, threshold, reason or reason2)
    try:
        _, vectors = ctx.backbone(run_backbone)
        value = float(fn(ctx.run, device=ctx.device, seed=ctx.seed, vectors=vectors))
    except BAD_INPUT:
        raise
    except CkptAuditError as e:
        return CheckResult("fisher_anisotropy", SKIPPED, None, threshold, e.message)
    out = _bounds(value, settings["min"], settings["max"])
    file = _weight_file(ctx.run.checkpoints[-1])
    return CheckResult("fisher_anisotropy", FAIL if out else PASS, value if math.isfinite(value) else None, threshold,
                       out or f"anisotropy {value:.4g}", file)  # fmt: skip


def check_backbone(ctx: GateContext, settings: dict) -> CheckResult:
    """Trunk rho_1 and k95 of the run's drift-matrix SVD within bounds (analyses.backbone.run_backbone)."""
    lo, hi, kmin, kmax = settings["rho1_min"], settings["rho1_max"], settings["k95_min"], settings["k95_max"]
    threshold = {}
    if lo is not None or hi is not None:
        threshold["rho1"] = _range(lo, hi)
    if kmin is not None or kmax is not None:
        threshold["k95"] = _range(kmin, kmax)
    n = len(ctx.run.checkpoints)
    if n < 3:
        return CheckResult("backbone", SKIPPED, None, threshold,
                           f"needs >= 3 checkpoints of a run, got {n}", str(ctx.run.path))  # fmt: skip
    run_backbone, reason = _optional("ckptaudit.analyses.backbone", "run_backbone")
    if run_backbone is None:
        return CheckResult("backbone", SKIPPED, None, threshold, reason)
    try:
        report, _ = ctx.backbone(run_backbone)
    except BAD_INPUT:
        raise
    except CkptAuditError as e:
        return CheckResult("backbone", SKIPPED, None, threshold, f"backbone analysis cannot run: {e.message}", str(ctx.run.path))
    if len(report.trunk.rho) == 0:
        return CheckResult("backbone", SKIPPED, None, threshold, "backbone analysis returned no trunk spectrum")
    rho1, k95 = float(report.trunk.rho[0]), int(report.trunk.k95)
    value = {"rho1": round(rho1, 6) if math.isfinite(rho1) else None, "k95": k95}
    problems = [("rho1 " if i == 0 else "k95 ") + p for i, p in enumerate((_bounds(rho1, lo, hi), _bounds(k95, kmin, kmax))) if p]
    file = _weight_file(ctx.run.checkpoints[-1])
    if problems:
        return CheckResult("backbone", FAIL, value, threshold, "trunk " + "; ".join(problems), file)
    return CheckResult("backbone", PASS, value, threshold, f"trunk rho1 {rho1:.4g}, k95 {k95} over {n} checkpoints", file)


def check_resume_probe(ctx: GateContext, settings: dict) -> CheckResult:
    """No collapse when resuming each gated checkpoint with a RESET optimizer at ``lr_multiplier`` (analyses.resume).

    Runs only that one RESET condition (no CONTROL, warm-up or boundary probe: the gate asks one question) and
    reads its verdict from the probe's condition results. A result the gate cannot judge is skipped, never passed.
    """
    mult = settings["lr_multiplier"]
    threshold = {"verdict": "stable", "lr_mult": mult}
    run_probe, reason = _optional("ckptaudit.analyses.resume", "run_resume_probe")
    settings_cls, reason2 = _optional("ckptaudit.analyses.resume", "ResumeSettings")
    load_inputs, reason3 = _optional("ckptaudit.analyses.resume_conditions", "probe_inputs_from_checkpoint")
    if run_probe is None or settings_cls is None or load_inputs is None:
        return CheckResult("resume_probe", SKIPPED, None, threshold, reason or reason2 or reason3)
    probe_kwargs: dict[str, Any] = {"lr_mults": (mult,), "warmup_steps": 0, "boundary_probe": False, "mode": "reset",
                                    "seed": ctx.seed, "device": ctx.device}  # fmt: skip
    if settings["steps"] is not None:
        probe_kwargs["steps"] = settings["steps"]
    verdict = None
    for ckpt in ctx.targets:
        try:
            inputs = load_inputs(ckpt.path, task=settings["task"], device=ctx.device)
            report = run_probe(inputs, settings_cls(**probe_kwargs))
        except BAD_INPUT:
            raise
        except CkptAuditError as e:
            return CheckResult("resume_probe", SKIPPED, None, threshold, f"{_label(ckpt)}: probe cannot run: {e.message}",
                               str(ckpt.path))  # fmt: skip
        cond = _reset_condition(report.conditions, mult)
        if cond is None:
            return CheckResult("resume_probe", SKIPPED, None, threshold,
                               f"{_label(ckpt)}: the probe reported no RESET condition at lr_mult {mult:g}")  # fmt: skip
        verdict = str(cond.verdict)
        if verdict != "stable":
            at = cond.collapse_step
            return CheckResult("resume_probe", FAIL, verdict, threshold,
                               f"{_label(ckpt)}: RESET at lr x{mult:g} collapses" + (f" at step {at}" if at is not None else ""),
                               _weight_file(ckpt), {"condition": cond.to_json()})  # fmt: skip
    n = len(ctx.targets)
    return CheckResult("resume_probe", PASS, verdict, threshold, f"RESET at lr x{mult:g} stable in {n} checkpoint(s)",
                       _weight_file(ctx.targets[-1]))  # fmt: skip


def _reset_condition(conditions: Sequence[Any], mult: float) -> Any:
    """The RESET condition without warm-up at ``mult`` among the probe's ConditionResults, or None."""
    for cond in conditions:
        if (cond.optimizer == "reset" and not cond.warmup_steps
                and abs(float(cond.lr_mult) - mult) <= 1e-9 * max(1.0, mult)):
            return cond
    return None


CHECKS: dict[str, Callable[[GateContext, dict], CheckResult]] = {
    "provenance": check_provenance,
    "safe_serialization": check_safe_serialization,
    "finite": check_finite,
    "resume_probe": check_resume_probe,
    "embedding_class": check_embedding_class,
    "fisher_anisotropy": check_fisher_anisotropy,
    "backbone": check_backbone,
}


def run_gate(run: Any, policy: Policy, device: str = "cpu", seed: int = 0,
             progress: Callable[[float], None] | None = None) -> GateResult:  # fmt: skip
    """Run every enabled check of ``policy`` on ``run`` (a discovered Run), in policy order."""
    ctx = GateContext(run, policy, device=device, seed=seed)
    results = []
    try:
        for name, settings in policy.checks.items():
            results.append(CHECKS[name](ctx, settings))
            if progress is not None:
                progress(1)
    finally:
        ctx.close()
    return GateResult(run=str(run.path), policy=policy.path, target=policy.target,
                      fail_on_skipped=policy.fail_on_skipped, checks=tuple(results))  # fmt: skip
