"""resume-probe (SPEC §3; paper 000 section 2, paper 001 section 6): same weights, different optimizer state.

From one checkpoint, training is resumed under several conditions that start from bit-identical weights (proved
by a SHA-256 of the parameters at step 0 of each condition) and see identical batches in identical order:

- ``control``: the saved optimizer state (moments, step counts, hyper-parameters) and the saved LR scheduler
  restored exactly and stepped as in the original run;
- ``reset`` / ``reset_lr{m}``: a fresh optimizer of the same class and hyper-parameters; its lr is held
  constant at ``m`` x the lr in effect at the checkpoint (the saved schedule is not continued);
- ``reset_warmup{W}``: fresh optimizer, lr ramped linearly: lr_k = lr * min(1, (k + 1) / W) at resumed step k;
- ``warmup_boundary``: fresh optimizer, lr ramped geometrically from 1e-3 x lr (step 0) to 1 x lr (step N-1),
  lr_k = lr * 1e-3 ** (1 - k / (N - 1)); evaluated after every step, and the multiplier of the update that
  first made it unstable is reported.

Verdict: "collapse" at the first eval step where accuracy < start accuracy - collapse_drop, or loss >
collapse_ratio x start loss (or not finite); "stable" otherwise. Level-2 sensitive = control stable and reset
(multiplier 1) collapses. Hash = SHA-256 over the raw bytes of every trainable parameter, in sorted name order.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptaudit.analyses.resume.conditions import ProbeInputs, fresh_optimizer, restored_optimizer
from ckptaudit.errors import OptimizerStateError, UsageError
from ckptaudit.io.vectors import read_vectors
from ckptaudit.report.tree import TreeResult

__all__ = [
    "BOUNDARY_START_MULT",
    "ConditionResult",
    "ConditionSpec",
    "ResumeProbeResult",
    "ResumeSettings",
    "default_eval_steps",
    "load_backbone_vector",
    "plan_conditions",
    "run_condition",
    "run_resume_probe",
    "weights_sha256",
]

BOUNDARY_START_MULT = 1e-3
MODES = ("both", "reset", "preserve")


@dataclass(frozen=True)
class ResumeSettings:
    """What to run. ``eval_every`` None -> steps 0, 1, 2, 5, 10, 20, 50, 100, ... and ``steps``.

    ``warmup_steps`` 0 disables the warm-up condition; ``mode`` is "both", "reset" (RESET family only) or
    "preserve" (CONTROL only). ``seed`` seeds torch before every condition (dropout masks are then the same).
    """

    steps: int = 50
    eval_every: int | None = None
    lr_mults: tuple[float, ...] = (1.0, 0.1, 0.01)
    warmup_steps: int = 10
    boundary_probe: bool = True
    collapse_drop: float = 0.2
    collapse_ratio: float = 2.0
    collapse_loss_floor: float = 0.1
    seed: int = 0
    mode: str = "both"
    device: str = "cpu"


@dataclass(frozen=True)
class ConditionSpec:
    """One condition: how its optimizer is made and its lr multiplier at resumed step k (0-based)."""

    name: str
    optimizer: str  # "preserved" | "reset"
    lr_mult: float
    warmup_steps: int
    schedule: str  # "saved" | "constant" | "linear-warmup" | "geometric"

    def multiplier(self, k: int, n_steps: int) -> float:
        """lr multiplier (of the checkpoint's lr) for resumed step k of ``n_steps``; "saved" -> 1 (unused)."""
        if self.schedule == "linear-warmup":
            return self.lr_mult * min(1.0, (k + 1) / max(1, self.warmup_steps))
        if self.schedule == "geometric":
            frac = k / (n_steps - 1) if n_steps > 1 else 1.0
            return self.lr_mult * BOUNDARY_START_MULT ** (1.0 - frac)
        return self.lr_mult


@dataclass(frozen=True)
class ConditionResult(TreeResult):
    """Metrics of one condition at its eval steps (``steps``; step 0 = the checkpoint).

    eval_loss in nats, eval_acc in [0, 1], displacement = ||theta - theta_0|| (2-norm over all trainable
    parameters). backbone_coord = <theta - theta_0, v_b>, transverse_residual = ||d - backbone_coord v_b|| over
    the tensors of the vectors file (None without --vectors). train_loss and lr: per resumed step (lr of group 0).
    """

    name: str
    optimizer: str
    lr_mult: float
    warmup_steps: int
    schedule: str
    steps: tuple[int, ...]
    eval_loss: tuple[float, ...]
    eval_acc: tuple[float, ...]
    displacement: tuple[float, ...]
    train_loss: tuple[float, ...]
    lr: tuple[float, ...]
    verdict: str
    collapse_step: int | None
    start_sha256: str
    collapse_lr_mult: float | None = None
    backbone_coord: tuple[float, ...] | None = None
    transverse_residual: tuple[float, ...] | None = None
    seconds: float | None = None
    collapse_rule: str | None = None  # "accuracy" | "loss" | "non-finite" (see first_collapse)
    collapse_reason: str | None = None

    def to_tree(self) -> dict:
        """The condition's entry of the JSON summary (keys of issue 5, plus schedule details); in the report, the
        group /resume_probe/<name> without ``name``."""
        out = {
            "name": self.name, "optimizer": self.optimizer, "lr_mult": self.lr_mult,
            "warmup_steps": self.warmup_steps, "schedule": self.schedule, "steps": list(self.steps),
            "eval_loss": list(self.eval_loss), "eval_acc": list(self.eval_acc),
            "displacement": list(self.displacement), "verdict": self.verdict, "collapse_step": self.collapse_step,
            "collapse_rule": self.collapse_rule, "collapse_reason": self.collapse_reason,
            "collapse_lr_mult": self.collapse_lr_mult, "start_sha256": self.start_sha256,
            "train_loss": list(self.train_loss), "lr": list(self.lr), "seconds": self.seconds,
        }  # fmt: skip
        if self.backbone_coord is not None:
            out["backbone_coord"] = list(self.backbone_coord)
            out["transverse_residual"] = list(self.transverse_residual or ())
        return out


@dataclass(frozen=True)
class ResumeProbeResult(TreeResult):
    """Result of a resume probe: one ConditionResult per condition and the summary of SPEC §3."""

    checkpoint: str
    start_step: int
    task: str
    conditions: tuple[ConditionResult, ...]
    level2_sensitive: bool | None
    max_safe_reset_lr_mult: float | None
    warmup_boundary_lr_mult: float | None
    start_weights_sha256: str
    provenance_complete: bool
    notes: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)

    def condition(self, name: str) -> ConditionResult:
        """The condition called ``name`` (KeyError when it was not run)."""
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(name)

    # The report: one group per condition (named after it), notes absent when there are none, settings without
    # the unset ones.
    HDF5_LAYOUT = {"conditions": "_condition_groups", "notes": "_notes", "settings": "_settings"}

    def to_tree(self) -> dict:
        """JSON summary with the stable keys of issue 5 (plus checkpoint, start_step, notes, settings); the report
        holds the summary as attributes of /resume_probe and one group per condition below it."""
        return {
            "checkpoint": self.checkpoint, "start_step": self.start_step, "task": self.task,
            "conditions": list(self.conditions), "level2_sensitive": self.level2_sensitive,
            "max_safe_reset_lr_mult": self.max_safe_reset_lr_mult,
            "warmup_boundary_lr_mult": self.warmup_boundary_lr_mult,
            "start_weights_sha256": self.start_weights_sha256, "provenance_complete": self.provenance_complete,
            "notes": list(self.notes), "settings": dict(self.settings),
        }  # fmt: skip

    @staticmethod
    def _condition_groups(conditions: list[ConditionResult]) -> dict[str, Any]:
        return {c.name: {k: v for k, v in c.to_tree().items() if k != "name"} for c in conditions}

    @staticmethod
    def _notes(notes: list[str]) -> dict[str, Any]:
        return {"notes": notes or None}

    @staticmethod
    def _settings(settings: dict) -> dict[str, Any]:
        return {"settings": {k: v for k, v in settings.items() if v is not None}}


# ------------------------------------------------------------------------------------------ planning


def default_eval_steps(n: int, every: int | None = None) -> list[int]:
    """Eval steps: 0, 1, 2, 5, 10, 20, 50, ... (1-2-5 decades) up to ``n``, plus ``n``; or 0, every, 2 every, ..., n."""
    if every is not None:
        if every < 1:
            raise UsageError(f"$eval_every={every}: must be >= 1", param="eval_every")
        out = list(range(0, n + 1, every))
    else:
        out, decade = [0], 1
        while decade <= n:
            out += [s for s in (decade, 2 * decade, 5 * decade) if s <= n]
            decade *= 10
    return sorted(set(out) | {n})


def _mult_label(m: float) -> str:
    return f"{m:g}"


def plan_conditions(settings: ResumeSettings, has_optimizer_state: bool) -> list[ConditionSpec]:
    """The conditions to run, in report order. CONTROL needs optimizer state; the rest do not."""
    if settings.mode not in MODES:
        raise UsageError(f"unknown mode {settings.mode!r}", hint=f"one of {', '.join(MODES)}")
    specs: list[ConditionSpec] = []
    if settings.mode in ("both", "preserve"):
        if not has_optimizer_state:
            if settings.mode == "preserve":
                raise OptimizerStateError(
                    "$preserve_optimizer: the checkpoint has no optimizer state to preserve",
                    hint="drop $preserve_optimizer to run the RESET conditions (provenance is incomplete)",
                    param="preserve_optimizer",
                )
        else:
            specs.append(ConditionSpec("control", "preserved", 1.0, 0, "saved"))
    if settings.mode in ("both", "reset"):
        seen: set[float] = set()
        for m in settings.lr_mults:
            if not (m > 0 and math.isfinite(m)):
                raise UsageError(f"$lr_mults={m}: multipliers must be positive numbers", param="lr_mults")
            if m in seen:
                continue
            seen.add(m)
            specs.append(
                ConditionSpec("reset" if m == 1 else f"reset_lr{_mult_label(m)}", "reset", m, 0, "constant")
            )
        if settings.warmup_steps > 0:
            specs.append(
                ConditionSpec(
                    f"reset_warmup{settings.warmup_steps}",
                    "reset",
                    1.0,
                    settings.warmup_steps,
                    "linear-warmup",
                )
            )
        if settings.boundary_probe:
            specs.append(ConditionSpec("warmup_boundary", "reset", 1.0, 0, "geometric"))
    return specs


# ------------------------------------------------------------------------------------------ measuring


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the raw bytes of every trainable parameter, in sorted name order (names not hashed)."""
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_backbone_vector(path: Path | str, model: nn.Module) -> dict[str, torch.Tensor]:
    """v_b by parameter name from a ``backbone --save-vectors`` file, normalised to unit length (float64).

    Entries are [k, *shape] (entry[0] = V_1 = v_b; only that row is read) or already [*shape]. The file may cover
    only some parameters; a vector entry the model lacks, or whose shape fits neither, is an error naming the
    tensor (``ckptaudit.io.vectors.read_vectors``). ``switch/<name>`` entries are not vector entries (not read).
    """
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return read_vectors(path, shapes, rows=1, partial=True).backbone(unit=True)


def _displacement(
    model: nn.Module, start: dict[str, torch.Tensor], vector: dict[str, torch.Tensor] | None
) -> tuple[float, float | None, float | None]:
    """(||theta - theta_0||, <d, v_b>, ||d_V - <d, v_b> v_b||) with d_V = the displacement on v_b's tensors."""
    total, coord, on_v = 0.0, 0.0, 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in start:
                continue
            d = p.detach().to("cpu", torch.float64) - start[name]
            sq = float((d * d).sum())
            total += sq
            if vector is not None and name in vector:
                coord += float((d * vector[name]).sum())
                on_v += sq
    if vector is None:
        return math.sqrt(total), None, None
    # ||d_V - a v||^2 = ||d_V||^2 - a^2 for unit v; clamp rounding below zero.
    return math.sqrt(total), coord, math.sqrt(max(on_v - coord * coord, 0.0))


def first_collapse(
    steps: Sequence[int], loss: Sequence[float], acc: Sequence[float], drop: float, ratio: float, floor: float
) -> tuple[int, str, str] | None:
    """(index, rule, reason) of the first eval that collapses, or None.

    Rules, in order: ``non-finite`` (loss or accuracy NaN/inf); ``accuracy`` (more than ``drop`` below the
    start); ``loss`` (above ``ratio`` x the start loss *and* more than ``floor`` nats above it: the floor keeps a
    converged model whose loss goes from 8.5e-5 to 2.8e-4 from counting as collapsed). ``reason`` says the values.
    """
    acc0, loss0 = acc[0], loss[0]
    for i in range(1, len(steps)):
        at = f"at step {steps[i]}"
        if not (math.isfinite(loss[i]) and math.isfinite(acc[i])):
            return i, "non-finite", f"loss {loss[i]} / accuracy {acc[i]} {at}"
        if acc[i] < acc0 - drop:
            return i, "accuracy", f"accuracy {acc0:.4g} -> {acc[i]:.4g} {at} (fell more than {drop:g})"
        if loss[i] > ratio * loss0 and loss[i] - loss0 > floor:
            return i, "loss", (f"loss {loss0:.4g} -> {loss[i]:.4g} {at} (above {ratio:g}x the start and more "
                               f"than {floor:g} nats higher)")
    return None


def _set_lr(optimizer: torch.optim.Optimizer, base: Sequence[float], mult: float) -> None:
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr * mult


def _start_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    # The trainable parameters only: a frozen base model (an adapter run) does not move, and copying it would
    # double its memory.
    return {n: p.detach().to("cpu", torch.float64).clone() for n, p in model.named_parameters() if p.requires_grad}


def run_condition(
    spec: ConditionSpec,
    inputs: ProbeInputs,
    settings: ResumeSettings,
    vector: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    start_cpu: dict[str, torch.Tensor] | None = None,
) -> tuple[ConditionResult, nn.Module]:
    """Run one condition for ``settings.steps`` steps; returns its result and the trained model (a copy)."""
    from ckptaudit.tasks.train import deterministic

    start_cpu = start_cpu if start_cpu is not None else _start_copy(inputs.model)
    n = settings.steps
    # The boundary probe looks for the first unstable update, so it is evaluated after every step.
    evals = (
        set(range(n + 1)) if spec.schedule == "geometric" else set(default_eval_steps(n, settings.eval_every))
    )
    model = copy.deepcopy(inputs.model).to(settings.device)
    sha = weights_sha256(model)
    base = [float(h["lr"]) for h in inputs.group_hyper]
    steps, losses, accs, disps, coords, resids, train_loss, lrs = [], [], [], [], [], [], [], []

    def record(k: int) -> None:
        loss, acc = inputs.evaluate(model)
        disp, coord, resid = _displacement(model, start_cpu, vector)
        steps.append(k)
        losses.append(float(loss))
        accs.append(float(acc))
        disps.append(disp)
        coords.append(coord)
        resids.append(resid)

    t0 = time.perf_counter()
    _restore_rng(inputs, settings)
    with deterministic():
        record(0)
        if inputs.loop is not None:
            def on_step(k: int) -> None:
                if k in evals:
                    record(k)
                if progress is not None:
                    progress(1)

            fresh = (lambda m: fresh_optimizer(m, inputs)) if spec.optimizer == "reset" else None
            train_loss, lrs = inputs.loop(spec.optimizer == "preserved", model, fresh,
                                          lambda k: spec.multiplier(k, n), n, on_step)
        else:
            if spec.optimizer == "preserved":
                optimizer, scheduler = restored_optimizer(model, inputs)
            else:
                optimizer, scheduler = fresh_optimizer(model, inputs), None
            for k in range(n):
                if spec.optimizer == "reset":
                    _set_lr(optimizer, base, spec.multiplier(k, n))
                lrs.append(float(optimizer.param_groups[0]["lr"]))
                train_loss.append(float(inputs.train_step(model, optimizer, k)))
                if scheduler is not None:
                    scheduler.step()
                if k + 1 in evals:
                    record(k + 1)
                if progress is not None:
                    progress(1)
    seconds = time.perf_counter() - t0
    hit = first_collapse(steps, losses, accs, settings.collapse_drop, settings.collapse_ratio,
                         settings.collapse_loss_floor)
    collapse_step = steps[hit[0]] if hit is not None else None
    # The update that made eval step s unstable is resumed step s-1; its multiplier marks the boundary.
    collapse_mult = (
        spec.multiplier(collapse_step - 1, n)
        if collapse_step is not None and spec.optimizer == "reset"
        else None
    )
    result = ConditionResult(
        name=spec.name, optimizer=spec.optimizer, lr_mult=spec.lr_mult, warmup_steps=spec.warmup_steps,
        schedule=spec.schedule, steps=tuple(steps), eval_loss=tuple(losses), eval_acc=tuple(accs),
        displacement=tuple(disps), train_loss=tuple(train_loss), lr=tuple(lrs),
        verdict="stable" if hit is None else "collapse", collapse_step=collapse_step, start_sha256=sha,
        collapse_lr_mult=collapse_mult, collapse_rule=hit[1] if hit else None,
        collapse_reason=hit[2] if hit else None,
        backbone_coord=tuple(coords) if vector is not None else None,
        transverse_residual=tuple(resids) if vector is not None else None, seconds=seconds,
    )  # fmt: skip
    return result, model


def _restore_rng(inputs: ProbeInputs, settings: ResumeSettings) -> None:
    """The RNG state every condition starts from: the checkpoint's rng_state.pth when it has one (dropout then
    draws what the run drew), else torch seeded with the probe's seed."""
    state = inputs.rng_state
    if state is None:
        torch.manual_seed(settings.seed)
        return
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and state.get("cuda") is not None and str(settings.device).startswith("cuda"):
        cuda = state["cuda"]
        torch.cuda.set_rng_state_all(cuda) if isinstance(cuda, (list, tuple)) else torch.cuda.set_rng_state(cuda)


def run_resume_probe(
    inputs: ProbeInputs,
    settings: ResumeSettings | None = None,
    vectors: Path | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ResumeProbeResult:
    """Run every planned condition from ``inputs`` and summarise (SPEC §3).

    ``vectors``: a ``backbone --save-vectors`` file; adds backbone coordinate and transverse residual of the
    displacement. ``progress(1)`` is called after every training step of every condition. Raises RuntimeError
    if the conditions did not start from bit-identical weights (the probe's premise).
    """
    settings = settings or ResumeSettings()
    if settings.steps < 1:
        raise UsageError(f"$train_steps={settings.steps}: must be >= 1", param="train_steps")
    notes = list(inputs.notes)
    if inputs.max_steps is not None and settings.steps > inputs.max_steps:
        if inputs.max_steps < 1:
            raise UsageError(f"{inputs.source}: the run ended at this checkpoint (max_steps reached); nothing to resume",
                             "pick an earlier checkpoint")
        notes.append(f"--train-steps {settings.steps} cut to {inputs.max_steps}: the run's max_steps ends there")
        settings = dataclasses.replace(settings, steps=inputs.max_steps)
    specs = plan_conditions(settings, inputs.optimizer_state is not None)
    if inputs.scheduler_factory is None and inputs.loop is None:  # CONTROL keeps the lr: say so, not "saved"
        specs = [dataclasses.replace(s, schedule="held") if s.optimizer == "preserved" else s for s in specs]
    if vectors is not None and "adapter" in inputs.report:
        raise UsageError(f"$vectors={vectors}: backbone vectors of an adapter run are over the merged weights, while "
                         "resume-probe moves the adapter parameters (lora_A, lora_B)",
                         "drop $vectors for adapter checkpoints; backbone reads the run's merged trajectory", param="vectors")
    start_cpu = _start_copy(inputs.model)
    vector = load_backbone_vector(vectors, inputs.model) if vectors is not None else None
    results = []
    for i, s in enumerate(specs, 1):
        stage = getattr(progress, "stage", None)
        if stage is not None:
            stage(f"resume-probe {s.name} ({i}/{len(specs)})", settings.steps)
        results.append(run_condition(s, inputs, settings, vector, progress, start_cpu)[0])
    results = tuple(results)
    hashes = {r.start_sha256 for r in results}
    if len(hashes) != 1:
        raise RuntimeError(f"conditions started from different weights: {sorted(hashes)}")

    by_name = {r.name: r for r in results}
    control, reset = by_name.get("control"), by_name.get("reset")
    level2 = (
        None
        if control is None or reset is None
        else (control.verdict == "stable" and reset.verdict == "collapse")
    )
    safe = [r.lr_mult for r in results if r.schedule == "constant" and r.verdict == "stable"]
    chance = inputs.chance_accuracy
    start_acc = results[0].eval_acc[0] if results and results[0].eval_acc else None
    if chance and start_acc is not None and start_acc <= 1.5 * chance:
        notes.append(f"the start accuracy {start_acc:.4g} is at chance ({chance:.4g}): the model has not learnt the "
                     "task, or the data is not what it was trained on (check --task / --data); accuracy verdicts "
                     "mean little here")
    boundary = by_name.get("warmup_boundary")
    if boundary is not None and boundary.verdict == "stable":
        notes.append(
            "warm-up boundary probe stayed stable up to 1x the lr: no boundary below the checkpoint's lr"
        )
    plain = {
        "steps": settings.steps, "eval_every": settings.eval_every, "lr_mults": list(settings.lr_mults),
        "warmup_steps": settings.warmup_steps, "collapse_drop": settings.collapse_drop,
        "collapse_ratio": settings.collapse_ratio, "collapse_loss_floor": settings.collapse_loss_floor,
        "seed": settings.seed, "mode": settings.mode,
        "device": settings.device, "base_lr": [float(h["lr"]) for h in inputs.group_hyper],
        "optimizer_class": inputs.optimizer_cls.__name__, "vectors": None if vectors is None else str(vectors),
        "control": inputs.control_mode, "run_values": dict(inputs.run_values),
        "timing_seconds": {r.name: r.seconds for r in results}, **inputs.report,
    }  # fmt: skip
    return ResumeProbeResult(
        checkpoint=inputs.source, start_step=inputs.start_step, task=inputs.task, conditions=results,
        level2_sensitive=level2, max_safe_reset_lr_mult=max(safe) if safe else None,
        warmup_boundary_lr_mult=boundary.collapse_lr_mult if boundary is not None else None,
        start_weights_sha256=hashes.pop(), provenance_complete=inputs.optimizer_state is not None,
        notes=tuple(notes), settings=plain,
    )  # fmt: skip
