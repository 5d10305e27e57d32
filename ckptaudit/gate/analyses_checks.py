"""Checks that run an analysis: resume probe, embedding class, Fisher anisotropy, backbone bounds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ckptaudit.analyses.embeddings.run import MAX_PAIRS
from ckptaudit.errors import CkptAuditError
from ckptaudit.gate.context import BAD_INPUT, GateContext, _label, _weight_file
from ckptaudit.gate.registry import Key, gate_check
from ckptaudit.gate.result import FAIL, PASS, SKIPPED, CheckResult


@gate_check(
    "resume_probe",
    "Resuming with a reset optimizer state at the configured learning-rate multiplier does not collapse.",
    {
        "lr_multiplier": Key("float", 1.0, "Learning-rate multiplier of the RESET condition.", positive=True),
        "steps": Key("int", None, "Optimizer steps of the probe.", minimum=1, optional=True,
                     default_text="the analysis' own (50)", example=50),
        "task": Key("str", None, "Built-in task whose data the probe trains and evaluates on, as `resume-probe --task` "
                    "takes it (`\"modadd:p=97\"`). Without either, the check is skipped: the probe's data is unknown.",
                    optional=True, default_text="the checkpoint's `ckptaudit_task.json`", example="modadd"),
    },
    doc="Resuming from the gated checkpoint with a fresh (RESET) optimizer at `lr_multiplier` times its learning rate "
    "must be `stable`: the verdict of `ckptaudit.analyses.resume.run` (the engine of `ckptaudit resume-probe`), which runs "
    "only that one condition here (no CONTROL, warm-up or boundary conditions). It trains, so it is slow on large "
    "models; skipped when the analysis cannot run on the checkpoint (the reason is the message).",
    value="the verdict of the RESET condition (`stable`, or how it collapsed).",
    init_enabled=False,
)  # fmt: skip
def check_resume_probe(ctx: GateContext, settings: dict) -> CheckResult:
    """No collapse when resuming each gated checkpoint with a RESET optimizer at ``lr_multiplier`` (analyses.resume).

    Runs only that one RESET condition (no CONTROL, warm-up or boundary probe: the gate asks one question) and
    reads its verdict from the probe's condition results. A result the gate cannot judge is skipped, never passed.
    """
    mult = settings["lr_multiplier"]
    threshold = {"verdict": "stable", "lr_mult": mult}
    from ckptaudit.analyses.resume.conditions import probe_inputs_from_checkpoint
    from ckptaudit.analyses.resume.run import ResumeSettings, run_resume_probe

    probe_kwargs: dict[str, Any] = {"lr_mults": (mult,), "warmup_steps": 0, "boundary_probe": False, "mode": "reset",
                                    "seed": ctx.seed, "device": ctx.device}  # fmt: skip
    if settings["steps"] is not None:
        probe_kwargs["steps"] = settings["steps"]
    verdict = None
    for ckpt in ctx.targets:
        try:
            inputs = probe_inputs_from_checkpoint(ckpt.path, task=settings["task"], device=ctx.device)
            report = run_resume_probe(inputs, ResumeSettings(**probe_kwargs))
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


@gate_check(
    "embedding_class",
    "The input embedding's overlap bulk has the expected class / bulk_index bounds.",
    {
        "expected": Key("str", None, "Required class (A: a dense Gaussian bulk, B: a sparse exponential bulk).",
                        choices=("A", "B"), optional=True),
        "bulk_index_min": Key("float", None, "Lowest allowed `bulk_index = ks_exp - ks_gauss`.", optional=True,
                              example=-1.0),
        "bulk_index_max": Key("float", None, "Highest allowed `bulk_index`.", optional=True, example=1.0),
        "pairs": Key("int", 200_000, "Sampled pairs for the overlap statistics (deterministic given `--seed`).",
                     minimum=2, maximum=MAX_PAIRS),
    },
    needs_one_of=("expected", "bulk_index_min", "bulk_index_max"),
    bounds=(("bulk_index_min", "bulk_index_max"),),
    doc="Bulk class of the input-embedding overlaps (`ckptaudit.analyses.embeddings.run`, as `ckptaudit "
    "classify-embeddings`).",
    value="`{\"class\", \"bulk_index\"}` of the last gated checkpoint (or of the first that fails).",
    init_enabled=False,
    init={"expected": "B"},
)  # fmt: skip
def check_embedding_class(ctx: GateContext, settings: dict) -> CheckResult:
    """Class A/B and bulk_index bounds of the input embedding of each gated checkpoint (analyses.embeddings)."""
    from ckptaudit.analyses.embeddings.run import embedding_matrices, overlap_stats

    lo, hi, expected = settings["bulk_index_min"], settings["bulk_index_max"], settings["expected"]
    threshold: dict[str, Any] = {}
    if expected is not None:
        threshold["class"] = expected
    if lo is not None or hi is not None:
        threshold["bulk_index"] = _range(lo, hi)
    values = []
    for ckpt in ctx.targets:
        try:
            mats = embedding_matrices(ckpt.path)  # the LM head is read only to tell whether it is tied; it is not classified
            res = overlap_stats(mats["embed"], pairs=settings["pairs"], seed=ctx.seed, device=ctx.device,
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


@gate_check(
    "fisher_anisotropy",
    "The Fisher anisotropy lies within the policy bounds.",
    {
        "min": Key("float", None, "Lowest allowed Fisher anisotropy.", optional=True, example=1.0),
        "max": Key("float", None, "Highest allowed Fisher anisotropy.", optional=True, example=1000.0),
    },
    needs_one_of=("min", "max"),
    bounds=(("min", "max"),),
    scope="run",
    doc="Bounds on the Fisher anisotropy alpha = q(v_b) / mean q(random) at the last checkpoint. The backbone v_b is "
    "computed from the run itself (so the run needs at least 3 checkpoints, else the check is skipped), once per gate "
    "run and shared with `[checks.backbone]`; M = 16 gradients of the task recorded in the checkpoint.",
    value="alpha (null when it is not finite: the check then fails, saying so).",
    init_enabled=False,
    init={"max": 1000.0},
)  # fmt: skip
def check_fisher_anisotropy(ctx: GateContext, settings: dict) -> CheckResult:
    """Fisher anisotropy within [min, max] via ckptaudit.analyses.fisher.run, along the backbone the gate computed once
    for the run (shared with the backbone check)."""
    threshold = _range(settings["min"], settings["max"])
    from ckptaudit.analyses.backbone.run import run_backbone
    from ckptaudit.analyses.fisher.run import fisher_anisotropy

    try:
        _, vectors = ctx.backbone(run_backbone)
        value = float(fisher_anisotropy(ctx.run, device=ctx.device, seed=ctx.seed, vectors=vectors))
    except BAD_INPUT:
        raise
    except CkptAuditError as e:
        return CheckResult("fisher_anisotropy", SKIPPED, None, threshold, e.message)
    out = _bounds(value, settings["min"], settings["max"])
    file = _weight_file(ctx.run.checkpoints[-1])
    return CheckResult("fisher_anisotropy", FAIL if out else PASS, value if math.isfinite(value) else None, threshold,
                       out or f"anisotropy {value:.4g}", file)  # fmt: skip


@gate_check(
    "backbone",
    "The trajectory's trunk backbone (PC1 share rho_1, k95) lies within the policy bounds.",
    {
        "rho1_min": Key("float", None, "Lowest allowed trunk first share ρ₁ = σ₁² / trace(G).", minimum=0.0,
                        optional=True, example=0.5),
        "rho1_max": Key("float", None, "Highest allowed trunk first share ρ₁.", minimum=0.0, optional=True,
                        example=1.0),
        "k95_min": Key("int", None, "Lowest allowed trunk k95 (directions holding 95% of the drift).", minimum=1,
                       optional=True, example=1),
        "k95_max": Key("int", None, "Highest allowed trunk k95.", minimum=1, optional=True, example=10),
    },
    needs_one_of=("rho1_min", "rho1_max", "k95_min", "k95_max"),
    bounds=(("rho1_min", "rho1_max"), ("k95_min", "k95_max")),
    scope="run",
    doc="Drift-matrix SVD of the whole run (`ckptaudit.analyses.backbone.run.run_backbone`, as `ckptaudit backbone`); "
    "needs at least three checkpoints, else skipped.",
    value="`{\"rho1\", \"k95\"}` of the trunk.",
    init_enabled=False,
    init={"rho1_min": 0.5, "k95_max": 10},
)  # fmt: skip
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
    from ckptaudit.analyses.backbone.run import run_backbone

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
