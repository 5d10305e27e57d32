"""The loss along each prediction direction (``extrapolate --landscape``; paper 004's code, ``landscape.py``).

For a prediction theta_hat from theta_t, delta = theta_hat - theta_t over every floating tensor and h = ||delta||
(parameter units). The model is filled with theta_t + f delta for f in FRACTIONS = (0.25, 0.5, 1, 1.5, 2) and its
held-out loss L(f) evaluated; L(0) = L_t is the checkpoint's own loss. So the cost is 5 extra weight builds and 5
held-out evaluations per prediction (the prediction itself is one). From those points, along the unit direction
delta / h (loss per parameter unit):

- ``derivative`` at theta_t: the forward difference (L(0.25) - L(0)) / (0.25 h) over the first quarter step (a
  one-sided stencil of higher order swings with the loss's higher derivatives, which far-off predictions excite);
- ``curvature`` (second derivative) on the central stencil (L(0) - 2 L(0.5) + L(1)) / (0.5 h)^2, the paper's code's
  ``curvature_estimate``; ``curvature_at_prediction`` = (L(0.5) - 2 L(1) + L(1.5)) / (0.5 h)^2 around theta_hat;
- ``secant_slope`` = (L(1) - L(0)) / h, the paper's code's ``directional_derivative``;
- ``best_fraction``: the f in {0, 0.25, 0.5, 1, 1.5, 2} with the lowest loss; ``line_minimum``: the minimum
  -derivative / (curvature h) of the quadratic L(0) + derivative s + curvature s^2 / 2 in units of the step (None
  unless derivative < 0 < curvature);
- ``reading``, why a prediction was (or was not) rejected, from the probed losses themselves: "uphill" (L(0.25) >=
  L(0): the direction raises the loss from the start), "overshoot" (the loss falls first and is lowest before the
  full step, best_fraction < 1), "on target" (best_fraction = 1), "undershoot" (the loss is still falling at the
  full step, best_fraction > 1); "no step" when the prediction equals theta_t (h = 0, e.g. a learning rate of 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ckptaudit.analyses.extrapolate.predictors import PredictionPlan, predicted_tensors
from ckptaudit.report.tree import TreeResult

FRACTIONS = (0.25, 0.5, 1.0, 1.5, 2.0)


class FractionStream:
    """``(name, theta_t + f (theta_hat - theta_t))`` for every tensor of ``plan``'s prediction, one at a time
    (non-floating tensors pass through). Once exhausted, ``norm`` is ||theta_hat - theta_t|| over the floating
    tensors."""

    def __init__(self, plan: PredictionPlan, fraction: float):
        self.plan, self.fraction = plan, float(fraction)
        self.norm: float | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        total = 0.0
        for name, pred, theta in predicted_tensors(self.plan):
            if not pred.is_floating_point():
                yield name, pred
                continue
            delta = pred - theta
            total += float(delta.square().sum())
            yield name, theta + self.fraction * delta
        self.norm = math.sqrt(total)


@dataclass(frozen=True)
class LandscapeProbe(TreeResult):
    """Losses along one prediction direction and what they say (module docstring). Losses in nats; ``norm`` in
    parameter units; derivative in nats per parameter unit, curvatures per parameter unit squared."""

    fractions: tuple[float, ...]
    losses: tuple[float, ...]
    loss_at_0: float
    norm: float
    derivative: float
    curvature: float
    curvature_at_prediction: float
    secant_slope: float
    best_fraction: float
    line_minimum: float | None
    reading: str

    def to_tree(self) -> dict[str, Any]:
        """Every field by name (the report holds them as columns over the probed predictions)."""
        d = asdict(self)
        d["fractions"], d["losses"] = list(self.fractions), list(self.losses)
        return d


def summarise(fractions: Sequence[float], losses: Sequence[float], loss_at_0: float, norm: float) -> LandscapeProbe:
    """The derivative, curvatures, best fraction and reading from L(0) and L at ``fractions`` (which must hold
    0.25, 0.5, 1 and 1.5). NaN derivatives and curvatures when h = 0."""
    L = dict(zip((float(f) for f in fractions), (float(x) for x in losses), strict=True))
    L[0.0] = float(loss_at_0)
    h = float(norm)
    nan = math.nan
    if h > 0:
        derivative = (L[0.25] - L[0.0]) / (0.25 * h)
        curvature = (L[0.0] - 2 * L[0.5] + L[1.0]) / (0.5 * h) ** 2
        at_pred = (L[0.5] - 2 * L[1.0] + L[1.5]) / (0.5 * h) ** 2
        secant = (L[1.0] - L[0.0]) / h
    else:
        derivative = curvature = at_pred = secant = nan
    finite = {f: x for f, x in L.items() if math.isfinite(x)}
    best = min(sorted(finite), key=lambda f: finite[f]) if finite else nan
    line_min = -derivative / (curvature * h) if derivative < 0 < curvature else None
    if not h > 0:
        reading = "no step"
    elif not (math.isfinite(L[0.25]) and math.isfinite(L[0.0])):
        reading = "undefined"
    elif L[0.25] >= L[0.0]:
        reading = "uphill"
    elif best < 1.0:
        reading = "overshoot"
    elif best == 1.0:
        reading = "on target"
    else:
        reading = "undershoot"
    return LandscapeProbe(tuple(float(f) for f in fractions), tuple(float(x) for x in losses), L[0.0], h, derivative,
                          curvature, at_pred, secant, best, line_min, reading)


def probe_landscape(plan: PredictionPlan, fill: Callable[[Any], None], evaluate: Callable[[], float],
                    loss_at_0: float, fractions: Sequence[float] = FRACTIONS) -> LandscapeProbe:
    """Fill the model with theta_t + f delta (``fill(stream)``) and evaluate it (``evaluate()``) at each fraction."""
    losses, norm = [], 0.0
    for f in fractions:
        stream = FractionStream(plan, f)
        fill(stream)
        norm = stream.norm if stream.norm is not None else norm
        losses.append(float(evaluate()))
    return summarise(fractions, losses, loss_at_0, norm)
