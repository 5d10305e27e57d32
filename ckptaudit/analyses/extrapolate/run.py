"""The `extrapolate` analysis over a run: losses and regimes per checkpoint, every predictor at every K,
acceptance rates per predictor, K and regime with their uncertainty, cascades, the predict+validate vs real-steps
timing, and on request the landscape along each prediction, the K-consecutive-stable gate and the moments rounded
to a storage precision.

Formulas and streaming are in ``ckptaudit.analyses.extrapolate.predictors``; regimes in ``ckptaudit.analyses.regimes.run``; the
landscape probe in ``extrapolate_landscape``, the gate and the intervals in ``extrapolate_stats``, the moment
rounding in ``extrapolate_moments``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ckptaudit.analyses.extrapolate.landscape import FRACTIONS, LandscapeProbe, probe_landscape
from ckptaudit.analyses.extrapolate.predictors import (
    CRITERIA,
    DEFAULT_K,
    FINITE_DIFFERENCE,
    MOMENT_DTYPES,
    PREDICTORS,
    PredictionPlan,
    PredictionStream,
    StepTiming,
    acceptance,
    recent_sigma,
)
from ckptaudit.analyses.extrapolate.stats import (
    DEFAULT_BOOTSTRAP,
    RateBootstrap,
    error_uncertainty,
    rate_uncertainty,
    stable_runs,
)
from ckptaudit.analyses.regimes.run import REGIMES, UNKNOWN, ProbeSet, RegimesResult, run_fingerprints
from ckptaudit.errors import CkptAuditError
from ckptaudit.io.types import StoredCheckpoint
from ckptaudit.report.tree import TreeResult


@dataclass(frozen=True)
class ExtrapolateSettings:
    """What to predict and how to judge it (defaults: the paper's protocol)."""

    predictors: tuple[str, ...] = PREDICTORS
    ks: tuple[int, ...] = DEFAULT_K
    cascades: tuple[tuple[int, int], ...] = ()  # (D links, K steps each)
    tolerance: float = 0.05  # proximity: |L_hat - L_t| < tolerance * L_t
    sigma_window: int = 5  # adaptive: std of the losses of the last `sigma_window` checkpoints
    skip_chaotic: bool = False  # the paper evaluates non-chaotic checkpoints only
    thresholds: tuple[float, float] | None = None  # fixed regime thresholds; None = adaptive percentiles
    device: str = "cpu"
    dtype: Any = None  # torch dtype of the model (None: float32)
    landscape: bool = False  # loss at FRACTIONS of each prediction: 5 more evaluations per prediction
    confirm_stable: int | None = None  # trust a prediction after this many consecutive stable checkpoints
    moment_dtype: str | None = None  # store m, v at this precision before momentum / adam-step (None: as loaded)
    bootstrap: int = DEFAULT_BOOTSTRAP  # replicates over the starting checkpoints for the rates (0: none)
    seed: int = 0


@dataclass(frozen=True)
class PredictionRow(TreeResult):
    """One validated prediction. Losses in nats; ``loss_true`` / ``rel_weight_error`` None when theta(t+K) is
    not in the run; ``link`` is 1 outside cascades; ``seconds`` = predict + validate wall time (without the
    landscape probe); ``stable_run``: consecutive stable checkpoints ending at t; ``trusted``: whether it passes the
    K-consecutive gate (None without one); ``landscape``: the probe along the prediction (None without one)."""

    step: int
    predictor: str
    K: int
    loss_pred: float
    loss_now: float
    loss_true: float | None
    rel_weight_error: float | None
    strict: bool
    adaptive: bool
    proximity: bool
    regime: str
    seconds: float
    link: int = 1
    D: int = 1
    stable_run: int = 0
    trusted: bool | None = None
    landscape: LandscapeProbe | None = None

    def to_tree(self, cascade: bool = False) -> dict:
        """One entry of ``results`` (with ``cascade``: of ``cascades/results``, with link and D): every field but
        seconds; trusted and landscape only when set."""
        d = {k: v for k, v in asdict(self).items() if k not in ("seconds", "landscape")}
        if not cascade:
            d.pop("link")
            d.pop("D")
        if d["trusted"] is None:
            d.pop("trusted")
        if self.landscape is not None:
            d["landscape"] = self.landscape
        return d


@dataclass(frozen=True)
class ExtrapolateResult(TreeResult):
    """Everything `extrapolate` reports (see ``to_tree`` for the keys).

    ``mean_rel_weight_error`` (computed from ``rows``): predictor -> str(K) -> mean of ``rel_weight_error`` over
    the predictions whose theta(t+K) is in the run; None where no prediction has one.
    """

    rows: tuple[PredictionRow, ...]
    cascade_rows: tuple[PredictionRow, ...]
    regimes: RegimesResult
    losses: tuple[float, ...]
    settings: ExtrapolateSettings
    timing: dict | None
    notes: tuple[str, ...] = field(default=())
    moment_rounding: tuple[dict, ...] = field(default=())
    mean_rel_weight_error: dict[str, dict[str, float | None]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_rel_weight_error", _mean_rel_errors(self.rows))

    def acceptance(self, regime: str | None = None) -> dict:
        """predictor -> str(K) -> criterion -> rate (fraction of predictions accepted); optionally one regime."""
        return _rates([r for r in self.rows if regime is None or r.regime == regime])

    def counts(self) -> dict:
        """predictor -> str(K) -> number of predictions behind each rate."""
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            out.setdefault(r.predictor, {}).setdefault(str(r.K), 0)
            out[r.predictor][str(r.K)] += 1
        return out

    def cascade_summary(self) -> dict:
        """"D:K" -> predictor -> criterion -> {"full_chain": fraction of chains with every link accepted,
        "mean_depth": mean number of leading accepted links}."""
        chains: dict[tuple, list[PredictionRow]] = {}
        for r in self.cascade_rows:
            chains.setdefault((f"{r.D}:{r.K}", r.predictor, r.step), []).append(r)
        out: dict[str, dict] = {}
        grouped: dict[tuple, list[list[PredictionRow]]] = {}
        for (spec, pred, _), links in chains.items():
            grouped.setdefault((spec, pred), []).append(sorted(links, key=lambda x: x.link))
        for (spec, pred), all_links in grouped.items():
            entry = {}
            for c in CRITERIA:
                depths = [_depth(links, c) for links in all_links]
                entry[c] = {
                    "full_chain": float(np.mean([d == len(ls) for d, ls in zip(depths, all_links, strict=True)])),
                    "mean_depth": float(np.mean(depths)),
                }
            out.setdefault(spec, {})[pred] = entry
        return out

    def uncertainty(self) -> dict:
        """Wilson intervals and the seeded bootstrap over starting checkpoints (``extrapolate_stats``) of every
        rate, overall and per regime, and of the mean relative weight errors."""
        st = self.settings
        boot = RateBootstrap([r.step for r in self.rows], st.bootstrap, st.seed) if self.rows else None
        present = [g for g in (*REGIMES, UNKNOWN) if any(r.regime == g for r in self.rows)]
        return {
            "bootstrap": boot.describe() if boot is not None and boot.active else None,
            "rates": rate_uncertainty(self.rows, boot),
            "by_regime": {g: rate_uncertainty([r for r in self.rows if r.regime == g], boot) for g in present},
            "mean_rel_weight_error": error_uncertainty(self.rows, boot),
        }

    def gate(self) -> dict | None:
        """With ``confirm_stable`` K: the trusted starting steps, the rates among trusted predictions (with their
        uncertainty) and "applied", the share of all predictions of each predictor and K that are trusted and
        accepted (what a predict-then-verify loop that obeys the gate would take); None without a gate."""
        k = self.settings.confirm_stable
        if k is None:
            return None
        ok = [r for r in self.rows if r.trusted]
        boot = RateBootstrap([r.step for r in self.rows], self.settings.bootstrap, self.settings.seed) if self.rows else None
        applied: dict[str, dict[str, dict[str, float]]] = {}
        for pred, kk, rs in _by_predictor_and_k(self.rows):
            applied.setdefault(pred, {})[str(kk)] = {c: sum(bool(r.trusted and getattr(r, c)) for r in rs) / len(rs)
                                                     for c in CRITERIA}
        counts: dict[str, dict[str, int]] = {}
        for pred, kk, rs in _by_predictor_and_k(ok):
            counts.setdefault(pred, {})[str(kk)] = len(rs)
        return {"K": int(k), "rule": f"trusted after {k} consecutive stable checkpoints (ending at t)",
                "trusted_steps": sorted({r.step for r in ok}), "acceptance": _rates(ok), "counts": counts,
                "uncertainty": rate_uncertainty(ok, boot), "applied": applied}

    def landscape_summary(self) -> dict | None:
        """With the landscape probe: its fractions and cost, and predictor -> str(K) -> reading -> number of
        predictions, over all predictions and over those the strict criterion rejected."""
        probed = [r for r in self.rows if r.landscape is not None]
        if not self.settings.landscape:
            return None
        out: dict[str, Any] = {"fractions": list(FRACTIONS), "evaluations": len(FRACTIONS) * len(probed),
                               "cost": f"{len(FRACTIONS)} weight builds and held-out evaluations per prediction"}
        for key, subset in (("readings", probed), ("rejected_readings", [r for r in probed if not r.strict])):
            table: dict[str, dict[str, dict[str, int]]] = {}
            for r in subset:
                cell = table.setdefault(r.predictor, {}).setdefault(str(r.K), {})
                cell[r.landscape.reading] = cell.get(r.landscape.reading, 0) + 1
            out[key] = table
        return out

    JSON_ONLY = frozenset({"notes"})
    HDF5_SKIP_NONE = frozenset({"timing"})
    # The report: predictions as columns, the uncertainty's [lo, hi] pairs as datasets, the settings as the
    # tolerance and sigma_window attributes, one group per step of moment_rounding; the optional parts
    # (cascades, gate, landscape, moment_rounding) absent when there are none.
    HDF5_LAYOUT = {"results": "_results_columns", "cascades": "_cascades_columns", "settings": "_settings_attrs",
                   "acceptance_uncertainty": "_uncertainty_datasets", "gate": "_gate_datasets",
                   "landscape": "_landscape_columns", "moment_rounding": "_moment_rounding_groups"}

    def to_tree(self) -> dict:
        """Keys (--json and /extrapolate): results (one PredictionRow each), acceptance, acceptance_by_regime,
        counts, mean_rel_weight_error, cascades (results and summary; null without --cascade), timing, losses
        (steps, loss), regimes (RegimesResult), settings, acceptance_uncertainty, stable_run, gate, landscape,
        moment_rounding, notes (--json only)."""
        present_regimes = [g for g in (*REGIMES, UNKNOWN) if any(r.regime == g for r in self.rows)]
        return {
            "results": list(self.rows),
            "acceptance": self.acceptance(),
            "acceptance_by_regime": {g: self.acceptance(g) for g in present_regimes},
            "counts": self.counts(),
            "mean_rel_weight_error": self.mean_rel_weight_error,
            "cascades": {"results": [r.to_tree(cascade=True) for r in self.cascade_rows],
                         "summary": self.cascade_summary()} if self.settings.cascades else None,  # fmt: skip
            "timing": self.timing,
            "losses": {"steps": np.asarray(self.regimes.steps, dtype=np.int64), "loss": np.asarray(self.losses)},
            "regimes": self.regimes,
            "settings": {"predictors": list(self.settings.predictors), "K": list(self.settings.ks),
                         "tolerance": self.settings.tolerance, "sigma_window": self.settings.sigma_window,
                         "skip_chaotic": self.settings.skip_chaotic, "landscape": self.settings.landscape,
                         "confirm_stable": self.settings.confirm_stable, "moment_dtype": self.settings.moment_dtype,
                         "bootstrap": self.settings.bootstrap, "seed": self.settings.seed},  # fmt: skip
            "acceptance_uncertainty": self.uncertainty(),
            "stable_run": np.asarray(stable_runs(self.regimes.regime), dtype=np.int64),
            "gate": self.gate(),
            "landscape": self.landscape_summary(),
            "moment_rounding": list(self.moment_rounding) or None,
            "notes": list(self.notes),
        }

    def _results_columns(self, rows: list[PredictionRow]) -> dict:
        return {"results": _columns(rows)}

    def _cascades_columns(self, cascades: dict | None) -> dict:
        if not self.cascade_rows:
            return {}
        return {"cascades": {"results": _columns(self.cascade_rows, cascade=True), "summary": cascades["summary"]}}

    @staticmethod
    def _settings_attrs(settings: dict) -> dict:
        return {"tolerance": settings["tolerance"], "sigma_window": settings["sigma_window"]}

    @staticmethod
    def _uncertainty_datasets(u: dict) -> dict:
        return {"acceptance_uncertainty": _hdf5_uncertainty(u)}

    @staticmethod
    def _gate_datasets(gate: dict | None) -> dict:
        if gate is None:
            return {}
        return {"gate": {**gate, "trusted_steps": np.asarray(gate["trusted_steps"], dtype=np.int64),
                         "uncertainty": _hdf5_uncertainty({"rates": gate["uncertainty"]})["rates"]}}

    def _landscape_columns(self, land: dict | None) -> dict:
        return {} if land is None else {"landscape": {**land, "results": _landscape_columns(self.rows)}}

    @staticmethod
    def _moment_rounding_groups(rounding: list[dict] | None) -> dict:
        return {"moment_rounding": {f"step_{m['step']}": m for m in rounding}} if rounding else {}


def _hdf5_uncertainty(u: dict) -> dict:
    """The uncertainty dict with its [lo, hi] pairs as float64 datasets (None -> NaN) for HDF5."""

    def conv(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return np.asarray([math.nan if v is None else v for v in x], dtype=np.float64)
        return x

    return conv({k: v for k, v in u.items() if v is not None})


def _landscape_columns(rows: Sequence[PredictionRow]) -> dict:
    """One dataset per landscape field over the probed predictions (losses: [n, len(FRACTIONS)])."""
    probed = [r for r in rows if r.landscape is not None]
    if not probed:
        return {}
    out: dict[str, Any] = {"step": np.asarray([r.step for r in probed], dtype=np.int64),
                           "predictor": [r.predictor for r in probed],
                           "K": np.asarray([r.K for r in probed], dtype=np.int64),
                           "fractions": np.asarray(FRACTIONS, dtype=np.float64),
                           "losses": np.asarray([r.landscape.losses for r in probed], dtype=np.float64),
                           "reading": [r.landscape.reading for r in probed]}
    for key in ("loss_at_0", "norm", "derivative", "curvature", "curvature_at_prediction", "secant_slope",
                "best_fraction", "line_minimum"):
        out[key] = np.asarray([math.nan if getattr(r.landscape, key) is None else getattr(r.landscape, key)
                               for r in probed], dtype=np.float64)
    return out


def _depth(links: Sequence[PredictionRow], criterion: str) -> int:
    depth = 0
    for r in links:
        if not getattr(r, criterion):
            break
        depth += 1
    return depth


def _by_predictor_and_k(rows: Sequence[PredictionRow]) -> list[tuple[str, int, list[PredictionRow]]]:
    """``(predictor, K, rows)`` in PREDICTORS order, then by K."""
    buckets: dict[tuple[str, int], list[PredictionRow]] = {}
    for r in rows:
        buckets.setdefault((r.predictor, r.K), []).append(r)
    ordered = sorted(buckets.items(), key=lambda x: (PREDICTORS.index(x[0][0]), x[0][1]))
    return [(pred, k, rs) for (pred, k), rs in ordered]


def _rates(rows: Sequence[PredictionRow]) -> dict:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for pred, k, rs in _by_predictor_and_k(rows):
        out.setdefault(pred, {})[str(k)] = {c: sum(getattr(r, c) for r in rs) / len(rs) for c in CRITERIA}
    return out


def _mean_rel_errors(rows: Sequence[PredictionRow]) -> dict[str, dict[str, float | None]]:
    """predictor -> str(K) -> mean rel_weight_error of the rows that have one (None when none has)."""
    out: dict[str, dict[str, float | None]] = {}
    for pred, k, rs in _by_predictor_and_k(rows):
        errs = [r.rel_weight_error for r in rs if r.rel_weight_error is not None]
        out.setdefault(pred, {})[str(k)] = sum(errs) / len(errs) if errs else None
    return out


def _columns(rows: Sequence[PredictionRow], cascade: bool = False) -> dict:
    """Column-wise arrays (one dataset per field) for HDF5; None becomes NaN."""
    if not rows:
        return {}
    out: dict[str, Any] = {}
    for key in rows[0].to_tree(cascade=cascade):
        if key == "landscape":  # its own group (``_landscape_columns``)
            continue
        vals = [getattr(r, key) for r in rows]
        if isinstance(vals[0], str):
            out[key] = vals
        elif isinstance(vals[0], bool):
            out[key] = np.asarray(vals, dtype=bool)
        elif key in ("step", "K", "link", "D", "stable_run"):
            out[key] = np.asarray(vals, dtype=np.int64)
        else:
            out[key] = np.asarray([math.nan if v is None else v for v in vals], dtype=np.float64)
    out["seconds"] = np.asarray([r.seconds for r in rows])
    return out


# ------------------------------------------------------------------------------------------- the run


def _load_optimizer(ckpt: StoredCheckpoint, notes: list[str]) -> Any:
    from ckptaudit.io.optimizer import load_optimizer_state

    if ckpt.optimizer_file is None:
        return None
    try:
        opt = load_optimizer_state(ckpt)
    except CkptAuditError as exc:
        notes.append(f"step {ckpt.step}: optimizer state unusable ({exc.message}); momentum/adam-step skipped")
        return None
    usable = any(s.exp_avg is not None and s.exp_avg_sq is not None for s in opt.state.values())
    problem = _moments_problem(ckpt, opt)
    if problem is not None:
        notes.append(f"step {ckpt.step}: optimizer state unusable ({problem}); momentum/adam-step skipped")
        return None
    if opt.groups and opt.groups[0].get("amsgrad"):
        notes.append(f"step {ckpt.step}: AMSGrad optimizer; adam-step uses v, not max(v)")
    return opt if usable else None


def _moments_problem(ckpt: StoredCheckpoint, opt: Any) -> str | None:
    """Why the stored moments cannot drive a prediction of ``ckpt``'s weights, or None: names that match no
    weight (the update would silently be zero), or a negative second moment (sqrt of it is NaN)."""
    with ckpt.tensors() as src:
        weights = set(src.keys())
    stray = sorted(set(opt.state) - weights)
    if stray:
        return (f"{len(stray)} of its {len(opt.state)} parameter names match no weight of the checkpoint "
                f"({', '.join(stray[:3])})")
    for name, st in opt.state.items():
        v = st.exp_avg_sq
        if v is not None and v.numel() and v.is_floating_point() and bool((v < 0).any()):
            return f"exp_avg_sq of {name} has negative entries (a second moment cannot be negative)"
    return None


def _plans(
    i: int, ckpts: Sequence[StoredCheckpoint], predictor: str, k: int, links: int, opt: Any, skipped: dict[str, set],
    moment_dtype: torch.dtype | None = None,
) -> PredictionPlan | None:
    """The plan for ``predictor`` from checkpoint i, or None (reason recorded in ``skipped``)."""
    steps = [int(c.step) for c in ckpts]
    if predictor in FINITE_DIFFERENCE:
        need = 1 if predictor == "linear" else 2
        if i < need:
            skipped.setdefault(f"{predictor}: not enough earlier checkpoints", set()).add(steps[i])
            return None
        delta = steps[i] - steps[i - 1]
        if need == 2 and steps[i - 1] - steps[i - 2] != delta:
            skipped.setdefault(f"{predictor}: checkpoint spacing not uniform before t", set()).add(steps[i])
            return None
        return PredictionPlan(predictor, ckpts[i], k, links, delta, ckpts[i - 1], ckpts[i - 2] if need == 2 else None)
    if opt is None:
        skipped.setdefault(f"{predictor}: no optimizer moments", set()).add(steps[i])
        return None
    return PredictionPlan(predictor, ckpts[i], k, links, optimizer=opt, moment_dtype=moment_dtype)


def run_extrapolate(
    run: Sequence[StoredCheckpoint],
    evaluate: Callable[[torch.nn.Module], float],
    probes: ProbeSet,
    settings: ExtrapolateSettings = ExtrapolateSettings(),
    timer: Callable[[Any, Sequence[int]], StepTiming] | None = None,
    progress: Callable[[float], None] | None = None,
) -> ExtrapolateResult:
    """Validate every predictor at every K from every checkpoint of ``run`` (see the module docstring).

    ``evaluate(model)`` is the held-out loss (nats) of a model; ``timer(checkpoint, ks)`` times K real
    training steps from that checkpoint (a StepTiming; None: no timing).
    """
    from ckptaudit.io.models import fill_model, load_model

    ckpts = list(run)
    steps = [int(c.step) for c in ckpts]
    by_step = {s: c for s, c in zip(steps, ckpts, strict=True)}
    notes: list[str] = []
    similarity, _, losses = run_fingerprints(ckpts, probes, settings.device, evaluate=evaluate, progress=progress,
                                             dtype=settings.dtype)
    regimes = RegimesResult.from_similarity(steps, similarity, settings.thresholds, probes.source)
    runs = stable_runs(regimes.regime)
    gate = settings.confirm_stable
    moment_dtype = MOMENT_DTYPES[settings.moment_dtype] if settings.moment_dtype else None
    rounding: list[dict] = []
    spacings = sorted({b - a for a, b in zip(steps, steps[1:])})
    if len(spacings) > 1:
        notes.append(f"checkpoint spacing varies ({spacings}): Delta is the spacing before each t")

    model = load_model(ckpts[-1], settings.device, dtype=settings.dtype)
    needs_opt = any(p in ("momentum", "adam-step") for p in settings.predictors)
    rows: list[PredictionRow] = []
    cascade_rows: list[PredictionRow] = []
    skipped: dict[str, set] = {}

    def fill(plan: PredictionPlan, stream: Any) -> None:
        mapped = plan.current.model_stream(model, stream)
        fill_model(model, mapped, f"{plan.current.path} ({plan.predictor} prediction)")

    def validate(plan: PredictionPlan, i: int, ref: float, link: int = 1, d: int = 1) -> PredictionRow:
        t0 = time.perf_counter()
        target = by_step.get(steps[i] + plan.horizon)
        stream = PredictionStream(plan, target)
        fill(plan, stream)
        rel = stream.rel_error
        loss = float(evaluate(model))
        seconds = time.perf_counter() - t0
        ok = acceptance(loss, ref, recent_sigma(losses, i, settings.sigma_window), settings.tolerance)
        loss_true = losses[steps.index(target.step)] if target is not None else None
        land = None
        if settings.landscape and link == 1 and d == 1:  # cascades are not probed
            land = probe_landscape(plan, lambda st: fill(plan, st), lambda: float(evaluate(model)), losses[i])
        return PredictionRow(steps[i], plan.predictor, plan.k, loss, ref, loss_true, rel, ok["strict"],
                             ok["adaptive"], ok["proximity"], regimes.regime[i], seconds, link, d, runs[i],
                             None if gate is None else runs[i] >= gate, land)  # fmt: skip

    for i in range(len(ckpts)):
        if settings.skip_chaotic and regimes.regime[i] == "chaotic":
            continue
        opt = _load_optimizer(ckpts[i], notes) if needs_opt else None
        if opt is not None and moment_dtype is not None:
            from ckptaudit.analyses.extrapolate.moments import moment_rounding

            rounding.append({"step": steps[i], **moment_rounding(opt, moment_dtype)})
        for predictor in settings.predictors:
            for k in settings.ks:
                plan = _plans(i, ckpts, predictor, k, 1, opt, skipped, moment_dtype)
                if plan is None:
                    break  # the reason does not depend on K
                rows.append(validate(plan, i, losses[i]))
            for d_links, k in settings.cascades:
                ref = losses[i]
                for link in range(1, d_links + 1):
                    plan = _plans(i, ckpts, predictor, k, link, opt, skipped, moment_dtype)
                    if plan is None:
                        break
                    row = validate(plan, i, ref, link, d_links)
                    cascade_rows.append(row)
                    ref = row.loss_pred
        del opt
        if progress is not None:
            progress(1)
    for reason, where in skipped.items():
        notes.append(f"{reason} at step(s) {sorted(where)}")
    notes.extend(_untargeted_horizons(rows, spacings))

    timing = None
    if timer is not None and rows:
        timing = _timing(rows, ckpts, by_step, timer, settings, notes)
    return ExtrapolateResult(tuple(rows), tuple(cascade_rows), regimes, tuple(losses), settings, timing, tuple(notes),
                             tuple(rounding))


def _untargeted_horizons(rows: Sequence[PredictionRow], spacings: Sequence[int]) -> list[str]:
    """One note per K for which no start had a saved checkpoint at t + K (so no weight error exists for it)."""
    ks = sorted({r.K for r in rows})
    missing = [k for k in ks if all(r.rel_weight_error is None for r in rows if r.K == k)]
    if not missing:
        return []
    every = f"every {spacings[0]} steps" if len(spacings) == 1 else f"at spacings {list(spacings)}"
    return [f"K={', '.join(map(str, missing))}: no saved checkpoint at t+K for any start, so no weight error; the run "
            f"is saved {every}: choose K on saved checkpoints"]


def _timing(rows, ckpts, by_step, timer, settings, notes) -> dict | None:
    """Median predict+validate seconds per predictor and K against K real steps from the last predicted-from
    checkpoint; ratio < 1 means predicting and validating is cheaper than training."""
    start = max(r.step for r in rows)
    try:
        train = timer(by_step[start], sorted(set(settings.ks)))
    except CkptAuditError as exc:
        notes.append(f"--time: the run's training step cannot be executed ({exc.message})")
        return None
    pv: dict[str, dict[str, float]] = {}
    ratio: dict[str, dict[str, float]] = {}
    secs_k = train.seconds
    for pred in settings.predictors:
        for k in settings.ks:
            secs = [r.seconds for r in rows if r.predictor == pred and r.K == k]
            if secs and k in secs_k:
                med = float(np.median(secs))
                pv.setdefault(pred, {})[str(k)] = med
                ratio.setdefault(pred, {})[str(k)] = med / secs_k[k] if secs_k[k] > 0 else math.nan
    return {"from_step": start, "device": settings.device, "train_seconds": {str(k): v for k, v in secs_k.items()},
            **train.to_json(), "predict_validate_seconds": pv, "ratio": ratio}  # fmt: skip
