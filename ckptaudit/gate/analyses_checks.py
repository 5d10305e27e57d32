"""Checks that run an analysis: resume probe, embedding class, Fisher anisotropy, backbone bounds."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

from ckptaudit.errors import CkptAuditError
from ckptaudit.gate.context import BAD_INPUT, GateContext, _label, _weight_file
from ckptaudit.gate.result import FAIL, PASS, SKIPPED, CheckResult

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
