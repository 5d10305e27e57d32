"""Cross-seed comparison of several runs of the same training recipe (SPEC §7, paper 004 section 2.4).

- ``loss_cv``: coefficient of variation (population std / mean) of the final validation loss across seeds: measured
  on the given data when there is some, else the last ``eval_loss`` each run recorded in its trainer_state.json (the
  report says which, per seed: ``final_loss_source``).
- ``first_entry`` / ``first_entry_std``: first step each seed enters each regime, and its population std across
  the seeds that entered it (None when fewer than two did).
- ``regime_agreement``: fraction of matched steps (present in every run, with a defined regime in every run)
  where all seeds are in the same regime.
- ``cka``: linear CKA between the seeds' probe representations ``[n_probes, d]`` at matched steps, per pair of
  seeds and averaged over pairs (the direct cross-seed comparison the paper leaves open).

Regimes are classified with one set of thresholds for every seed: the fixed ones when given, otherwise the
30th / 70th percentiles of the pooled s_t of all seeds, so that "stable" means the same similarity everywhere
and agreement is not forced by per-seed percentiles (which put ~30% of every seed in each tail by construction).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ckptaudit.analyses.regimes.run import (
    REGIMES,
    UNKNOWN,
    ProbeSet,
    Thresholds,
    classify,
    first_entries,
    regime_thresholds,
    run_fingerprints,
)
from ckptaudit.io.types import StoredCheckpoint


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same ``n`` inputs, ``x [n, d1]``, ``y [n, d2]``.

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y (float64). In [0, 1]; invariant to
    orthogonal transforms and isotropic scaling of either side. NaN when a side is constant.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    denom = float(torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))
    if denom == 0.0:
        return math.nan
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2) / denom


@dataclass(frozen=True)
class SeedRegimes:
    """One seed's trajectory: steps, similarity s_t, regimes (under the shared thresholds), final loss."""

    label: str
    steps: tuple[int, ...]
    similarity: tuple[float, ...]
    regime: tuple[str, ...]
    first_entry: dict[str, int | None]
    final_loss: float | None
    final_loss_source: str | None = None


@dataclass(frozen=True)
class CrossSeedResult:
    """Cross-seed statistics (see the module docstring)."""

    seeds: tuple[SeedRegimes, ...]
    thresholds: Thresholds
    loss_cv: float | None
    first_entry_std: dict[str, float | None]
    regime_agreement: float | None
    matched_steps: tuple[int, ...]
    cka_pairs: dict[str, tuple[float, ...]]
    probes: str
    notes: tuple[str, ...] = field(default=())

    @property
    def cka_mean(self) -> list[float]:
        """Mean over seed pairs of CKA at each matched step."""
        if not self.cka_pairs:
            return []
        return [float(np.nanmean(v)) for v in zip(*self.cka_pairs.values(), strict=True)]

    def cka_json(self) -> dict:
        return {"steps": list(self.matched_steps), "mean": self.cka_mean,
                "pairs": {k: list(v) for k, v in self.cka_pairs.items()}}  # fmt: skip

    def to_json(self) -> dict:
        return {
            "loss_cv": self.loss_cv,
            "first_entry_std": self.first_entry_std,
            "regime_agreement": self.regime_agreement,
            "cka": self.cka_json(),
            "thresholds": self.thresholds.to_json(),
            "seeds": [
                {"label": s.label, "final_loss": s.final_loss, "final_loss_source": s.final_loss_source,
                 "first_entry": s.first_entry, "steps": list(s.steps),
                 "similarity": list(s.similarity), "regime": list(s.regime)}
                for s in self.seeds
            ],  # fmt: skip
            "matched_steps": list(self.matched_steps),
            "probes": self.probes,
            "notes": list(self.notes),
        }

    def to_hdf5_tree(self) -> dict:
        seeds = {
            s.label: {
                "steps": np.asarray(s.steps, dtype=np.int64), "similarity": np.asarray(s.similarity),
                "regime": list(s.regime), "first_entry": {k: (-1 if v is None else v) for k, v in s.first_entry.items()},
                "final_loss": s.final_loss, "final_loss_source": s.final_loss_source,
            }
            for s in self.seeds
        }  # fmt: skip
        return {
            "loss_cv": self.loss_cv,
            "first_entry_std": dict(self.first_entry_std),
            "regime_agreement": self.regime_agreement,
            "thresholds": self.thresholds.to_json(),
            "cka": {"steps": np.asarray(self.matched_steps, dtype=np.int64), "mean": np.asarray(self.cka_mean),
                    "pairs": {k: np.asarray(v) for k, v in self.cka_pairs.items()}},  # fmt: skip
            "seeds": seeds,
            "probes": self.probes,
        }


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    """Population std / mean of ``values``; None with fewer than two finite values or a zero mean."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size < 2 or v.mean() == 0:
        return None
    return float(v.std() / abs(v.mean()))


def regime_agreement(seeds: Sequence[SeedRegimes], steps: Sequence[int]) -> float | None:
    """Fraction of ``steps`` at which every seed has the same (known) regime; None when no step qualifies."""
    maps = [dict(zip(s.steps, s.regime, strict=True)) for s in seeds]
    usable = [t for t in steps if all(m.get(t, UNKNOWN) != UNKNOWN for m in maps)]
    if not usable:
        return None
    return sum(len({m[t] for m in maps}) == 1 for t in usable) / len(usable)


def first_entry_std(seeds: Sequence[SeedRegimes]) -> dict[str, float | None]:
    """Population std (in steps) of each regime's first-entry step over the seeds that entered it."""
    out: dict[str, float | None] = {}
    for r in REGIMES:
        v = [s.first_entry[r] for s in seeds if s.first_entry.get(r) is not None]
        out[r] = float(np.std(v)) if len(v) >= 2 else None
    return out


def run_cross_seed(
    runs: Sequence[tuple[str, Sequence[StoredCheckpoint]]],
    probes: ProbeSet,
    fixed: tuple[float, float] | None = None,
    evaluators: Sequence[Callable[[torch.nn.Module], float] | None] | None = None,
    device: str = "cpu",
    progress: Callable[[float], None] | None = None,
    dtype: torch.dtype | None = None,
) -> CrossSeedResult:
    """Cross-seed statistics of ``runs`` (``(label, checkpoints)`` pairs, at least two).

    ``evaluators[i]`` gives the validation loss of run i's model; None: the last eval_loss run i recorded in its
    trainer_state.json (io.hyperparams.recorded_eval_losses), else no loss for that run. Representations
    ``[n_probes, d]`` of every checkpoint are held for CKA (n_checkpoints x n_probes x d floats per run).
    """
    from ckptaudit.io.hyperparams import recorded_eval_losses

    evaluators = list(evaluators or [None] * len(runs))
    notes: list[str] = []
    raw = []
    sources: dict[str, str | None] = {}
    for (label, ckpts), evaluate in zip(runs, evaluators, strict=True):
        sim, reps, _ = run_fingerprints(ckpts, probes, device, keep=True, progress=progress, dtype=dtype)
        final_loss, sources[label] = None, None
        if evaluate is not None and len(ckpts):
            from ckptaudit.io.models import load_model

            final_loss = float(evaluate(load_model(ckpts[-1], device, dtype=dtype)))
            sources[label] = "measured on the given data"
        elif len(ckpts) and (logged := recorded_eval_losses(ckpts[-1])):
            step, final_loss = logged[-1]
            sources[label] = f"eval_loss recorded in trainer_state.json at step {step}"
        raw.append((label, [int(c.step) for c in ckpts], sim, reps, final_loss))
    recorded = [k for k, v in sources.items() if v and v.startswith("eval_loss")]
    if recorded:
        notes.append(f"final loss of {', '.join(recorded)} from the eval_loss each run recorded in trainer_state.json "
                     "(not measured: give --data FILE to measure every run on the same data)")
    missing = [k for k, v in sources.items() if v is None]
    if missing:
        notes.append(f"no final loss for {', '.join(missing)} (no data and no eval_loss in trainer_state.json): "
                     "give --data FILE to measure it" + ("; loss_cv uses the others" if len(runs) - len(missing) >= 2
                                                          else "; loss_cv needs two runs with a loss"))
    pooled = [s for _, _, sim, _, _ in raw for s in sim]
    th = regime_thresholds(pooled, fixed)
    seeds = []
    for label, steps, sim, _, loss in raw:
        reg = classify(sim, th)
        seeds.append(SeedRegimes(label, tuple(steps), tuple(sim), tuple(reg), first_entries(steps, reg), loss,
                                 sources[label]))
    matched = sorted(set.intersection(*(set(s.steps) for s in seeds)))
    if len(matched) < max(len(s.steps) for s in seeds):
        notes.append(f"{len(matched)} steps are present in every run; agreement and CKA use those only")
    pairs: dict[str, tuple[float, ...]] = {}
    for (la, sa, _, ra, _), (lb, sb, _, rb, _) in itertools.combinations(raw, 2):
        ia, ib = {t: i for i, t in enumerate(sa)}, {t: i for i, t in enumerate(sb)}
        pairs[f"{la}~{lb}"] = tuple(linear_cka(ra[ia[t]], rb[ib[t]]) for t in matched)
    return CrossSeedResult(
        seeds=tuple(seeds),
        thresholds=th,
        loss_cv=coefficient_of_variation([s.final_loss for s in seeds]),
        first_entry_std=first_entry_std(seeds),
        regime_agreement=regime_agreement(seeds, matched),
        matched_steps=tuple(matched),
        cka_pairs=pairs,
        probes=probes.source,
        notes=tuple(notes),
    )
