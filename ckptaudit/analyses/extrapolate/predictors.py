"""Speculative weight prediction: the predictors, their streaming construction, acceptance (SPEC §7, paper 004).

Checkpoints theta_t every Delta steps; a predictor guesses theta(t+K):

    linear      theta_t + (K/Delta) (theta_t - theta_{t-Delta})
    quadratic   linear + K (K - Delta) / (2 Delta^2) (theta_t - 2 theta_{t-Delta} + theta_{t-2 Delta})
                (the paper's eq. 5 and SPEC §7 as printed, kept for reproduction)
    quadratic-fit  linear + K (K + Delta) / (2 Delta^2) (same second difference): the parabola through the three
                checkpoints evaluated at t + K (Newton's backward-difference formula), which is what the paper
                describes in words; the printed coefficient K (K - Delta) is not exact on quadratic trajectories
                (it differs from the fit by (K / Delta) times the second difference)
    momentum    theta_t + K m_t / sqrt(v_t + eps)                     (the paper's formula, for reproduction)
    adam-step   theta_t - K lr (mhat / (sqrt(vhat) + eps) + wd theta_t),  mhat = m / (1 - b1^step),
                vhat = v / (1 - b2^step), with the optimizer's own lr, betas, eps, weight decay and step count

Delta is the spacing before t (``t - t_prev``); quadratic and quadratic-fit need the two spacings before t to be equal and is
skipped (with a note) where they are not. adam-step reuses the moments stored at t for all K steps (the coming
gradients are unknown); for K = 1 it is exactly torch.optim.AdamW's update with those moments. With Adam's
coupled weight decay (``decoupled_weight_decay`` False) the decay is already inside the moments and the wd term
is dropped. Parameters without optimizer state (never got a gradient) stay at theta_t. With a moment dtype
(``--moment-dtype``) m and v are first stored at that precision (torch's round-to-nearest ``Tensor.to``), as the
paper's code keeps them in float16, and then used in float64: what the storage precision does to the predictors.

Predictions are built one tensor at a time from the (at most three) checkpoints and the optimizer state a
predictor needs, written straight into the one model that is then validated (``PredictionStream`` fed to
``ckptaudit.io.models.fill_model``), so memory is one model plus the predictor's inputs. Acceptance of a
predicted loss L_hat against the current loss L_t (``acceptance``): strict L_hat < L_t; adaptive
L_hat < L_t + sigma_L (population std of the losses of the last ``window`` checkpoints up to t); proximity
|L_hat - L_t| < tolerance * L_t. A non-finite L_hat is never accepted.

Cascades (D links of K steps): chaining a finite-difference predictor through its own predictions re-fits the
same polynomial, so link d of linear / quadratic-fit / momentum equals the one-shot prediction at d*K and is built
that way (the paper's quadratic, which is no fit, is also evaluated at d*K); adam-step chains its update d times with the stored moments (weight decay compounds). Link d is
validated against the previous link's loss (L_t for the first).

The run loop lives in ``ckptaudit.analyses.extrapolate.run``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREDICTORS = ("linear", "quadratic", "quadratic-fit", "momentum", "adam-step")
MOMENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FINITE_DIFFERENCE = ("linear", "quadratic", "quadratic-fit")
DEFAULT_K = (5, 10, 25, 50, 75, 100)
CRITERIA = ("strict", "adaptive", "proximity")


# ------------------------------------------------------------------------------ per-tensor formulas


def linear_prediction(theta_t: torch.Tensor, theta_prev: torch.Tensor, k: float, delta: float) -> torch.Tensor:
    """theta_t + (k / delta) (theta_t - theta_prev); same shape as theta_t."""
    return theta_t + (k / delta) * (theta_t - theta_prev)


def quadratic_prediction(
    theta_t: torch.Tensor, theta_prev: torch.Tensor, theta_prev2: torch.Tensor, k: float, delta: float
) -> torch.Tensor:
    """The paper's eq. 5 as printed (coefficient k (k - delta) / (2 delta^2)); see ``quadratic_fit_prediction``."""
    curvature = theta_t - 2.0 * theta_prev + theta_prev2
    return linear_prediction(theta_t, theta_prev, k, delta) + (k * (k - delta) / (2.0 * delta**2)) * curvature


def quadratic_fit_prediction(
    theta_t: torch.Tensor, theta_prev: torch.Tensor, theta_prev2: torch.Tensor, k: float, delta: float
) -> torch.Tensor:
    """The parabola through theta at (t-2 delta, t-delta, t) evaluated at t + k: exact on quadratic trajectories."""
    curvature = theta_t - 2.0 * theta_prev + theta_prev2
    return linear_prediction(theta_t, theta_prev, k, delta) + (k * (k + delta) / (2.0 * delta**2)) * curvature


def momentum_prediction(
    theta_t: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, k: float, eps: float
) -> torch.Tensor:
    """theta_t + k m_t / sqrt(v_t + eps): the paper's eq. 3 as printed (sign and bias correction as in the paper)."""
    return theta_t + k * exp_avg / torch.sqrt(exp_avg_sq + eps)


def adam_step_prediction(
    theta_t: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    k: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    links: int = 1,
) -> torch.Tensor:
    """theta_t - k lr (mhat / (sqrt(vhat) + eps) + wd theta_t), applied ``links`` times with the same moments.

    ``step`` is the optimizer's step count of the stored moments (bias corrections 1 - beta^step). The
    ordering of operations follows torch's AdamW so that k = 1 matches it to rounding.
    """
    b1, b2 = betas
    bc1 = 1.0 - b1**step
    bc2 = 1.0 - b2**step
    update = (exp_avg / bc1) / (exp_avg_sq.sqrt() / math.sqrt(bc2) + eps)
    theta = theta_t
    for _ in range(links):
        theta = theta * (1.0 - k * lr * weight_decay) - (k * lr) * update
    return theta


# ----------------------------------------------------------------------------------------- acceptance


def recent_sigma(losses: Sequence[float], index: int, window: int = 5) -> float:
    """Population std of the finite losses of checkpoints ``index - window + 1 .. index`` (0 with fewer than 2)."""
    v = np.asarray(losses[max(0, index - window + 1) : index + 1], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.std()) if v.size >= 2 else 0.0


def acceptance(loss_pred: float, loss_ref: float, sigma: float, tolerance: float = 0.05) -> dict[str, bool]:
    """The three criteria for a predicted loss against a reference loss (see the module docstring)."""
    if not (math.isfinite(loss_pred) and math.isfinite(loss_ref)):
        return dict.fromkeys(CRITERIA, False)
    return {
        "strict": loss_pred < loss_ref,
        "adaptive": loss_pred < loss_ref + sigma,
        "proximity": abs(loss_pred - loss_ref) < tolerance * abs(loss_ref),
    }


# --------------------------------------------------------------------------------- streaming predictions


@dataclass(frozen=True, eq=False)
class PredictionPlan:
    """One prediction: ``predictor`` from checkpoint ``current`` (step t) to t + k * links.

    ``previous`` / ``previous2`` are the checkpoints at t - delta and t - 2 delta (finite differences);
    ``optimizer`` the OptimizerState of ``current`` (momentum, adam-step); ``moment_dtype`` the precision the
    moments are stored at before use (None: as loaded).
    """

    predictor: str
    current: Any
    k: int
    links: int = 1
    delta: int | None = None
    previous: Any = None
    previous2: Any = None
    optimizer: Any = None
    moment_dtype: torch.dtype | None = None

    @property
    def horizon(self) -> int:
        """Steps ahead of t the prediction lands: k * links."""
        return self.k * self.links


def _optimizer_lookup(optimizer: Any) -> dict[str, dict]:
    """name -> (its ParamState, its group's hyper-parameters), once per plan instead of a scan per tensor."""
    groups = {name: optimizer.groups[g] for g, names in enumerate(optimizer.names) for name in names}
    return {name: (st, groups.get(name, {})) for name, st in optimizer.state.items()}


def _predict_tensor(plan: PredictionPlan, name: str, theta: torch.Tensor, sources: dict, lookup: dict | None) -> torch.Tensor:
    p = plan.predictor
    if p in FINITE_DIFFERENCE:
        prev = sources["previous"].get(name).double()
        if p == "linear":
            return linear_prediction(theta, prev, plan.horizon, plan.delta)
        prev2 = sources["previous2"].get(name).double()
        fn = quadratic_prediction if p == "quadratic" else quadratic_fit_prediction
        return fn(theta, prev, prev2, plan.horizon, plan.delta)
    entry = lookup.get(name) if lookup is not None else None
    if entry is None or entry[0].exp_avg is None or entry[0].exp_avg_sq is None:
        return theta  # no optimizer moments for this tensor: it has not moved by the optimizer's account
    state, hyper = entry
    m, v = stored_moments(state, plan.moment_dtype)
    eps = float(hyper.get("eps", 1e-8))
    if p == "momentum":
        return momentum_prediction(theta, m, v, plan.horizon, eps)
    decoupled = hyper.get("decoupled_weight_decay", True)
    wd = float(hyper.get("weight_decay", 0.0)) if decoupled else 0.0
    return adam_step_prediction(
        theta, m, v, float(state.step or 1.0), plan.k, float(hyper["lr"]),
        tuple(hyper.get("betas", (0.9, 0.999))), eps, wd, links=plan.links,
    )  # fmt: skip


def stored_moments(state: Any, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) of a ParamState as float64 CPU tensors, rounded to ``dtype`` first (None: as loaded)."""
    m, v = state.exp_avg, state.exp_avg_sq
    if dtype is not None:
        m, v = m.to(dtype), v.to(dtype)
    return m.double().cpu(), v.double().cpu()


def predicted_tensors(plan: PredictionPlan) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, theta_hat, theta_t)`` for every tensor of the current checkpoint, one at a time (float64 CPU for
    floating tensors; others pass through unchanged)."""
    lookup = _optimizer_lookup(plan.optimizer) if plan.optimizer is not None else None
    with contextlib.ExitStack() as stack:
        sources = {"current": stack.enter_context(plan.current.tensors())}
        for key in ("previous", "previous2"):
            ckpt = getattr(plan, key)
            if ckpt is not None:
                sources[key] = stack.enter_context(ckpt.tensors())
        for name in sources["current"].keys():
            raw = sources["current"].get(name)
            if not raw.is_floating_point():
                yield name, raw, raw
                continue
            theta = raw.double()
            yield name, _predict_tensor(plan, name, theta, sources, lookup), theta


class PredictionStream:
    """``plan``'s prediction as ``(name, theta_hat)`` pairs, one tensor at a time: feed it to
    ``ckptaudit.io.models.fill_model`` (which checks names and shapes against the model) or to any consumer.

    With ``target`` (the checkpoint at t + horizon), once the stream is exhausted ``rel_error`` is
    ||theta_hat - theta_target|| / ||theta_target - theta_t|| over all floating tensors (NaN when the target
    equals theta_t); it is None before then and without a target.
    """

    def __init__(self, plan: PredictionPlan, target: Any = None):
        self.plan = plan
        self.target = target
        self.rel_error: float | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        err2 = move2 = 0.0
        with contextlib.ExitStack() as stack:
            truth = stack.enter_context(self.target.tensors()) if self.target is not None else None
            for name, pred, theta in predicted_tensors(self.plan):
                if truth is not None and pred.is_floating_point() and name in truth:
                    true = truth.get(name).double()
                    err2 += float((pred - true).square().sum())
                    move2 += float((true - theta).square().sum())
                yield name, pred
        if self.target is not None:
            self.rel_error = math.sqrt(err2 / move2) if move2 > 0 else math.nan


# ------------------------------------------------------------------------------------ real-step timing


@dataclass(frozen=True)
class StepTiming:
    """Wall-clock seconds of K real training steps from a checkpoint (cumulative, after one untimed warm-up step),
    how the steps were taken, and how many the optimizer counted (its state's step counter, warm-up included)."""

    seconds: dict[int, float]
    loop: str
    batch_size: int
    batch_size_source: str
    optimizer_steps: int | None

    def to_json(self) -> dict[str, Any]:
        return {"loop": self.loop, "batch_size": self.batch_size, "batch_size_source": self.batch_size_source,
                "optimizer_steps": self.optimizer_steps}  # fmt: skip


def _optimizer_step_count(optimizer: torch.optim.Optimizer) -> int | None:
    """The largest per-parameter step counter in an optimizer's state (AdamW's ``step``); None without one."""
    counts = [int(st["step"]) for st in optimizer.state.values() if "step" in st]
    return max(counts) if counts else None


def _timed_steps(step: Any, ks: Sequence[int], device: Any) -> dict[int, float]:
    """Run ``step(i)`` for i = 0 (untimed warm-up: the first step pays one-off costs, lazy kernels and the
    allocator, that the steady state does not) and then 1 .. max(ks); the cumulative seconds after each K in ks."""
    import time

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    wanted = set(ks)
    out: dict[int, float] = {}
    step(0)
    sync()
    t0 = time.perf_counter()
    for i in range(max(ks)):
        step(i + 1)
        if i + 1 in wanted:
            sync()
            out[i + 1] = time.perf_counter() - t0
    return out


def time_training_steps(ckpt_dir: Any, ks: Sequence[int], device: str = "cpu", *, data: Any = None,
                        task: str | None = None, windows: Any = None, dtype: str | None = None) -> StepTiming:
    """Wall-clock seconds of K real training steps from checkpoint ``ckpt_dir`` (see StepTiming).

    A checkpoint written by ``tasks.train.train_run`` trains with ``tasks.train.train_step`` on the run's own
    batches, clipping and scheduler. Any other checkpoint (a ``transformers.Trainer`` run, ...) trains in
    resume-probe's loop (``analyses.resume``: the run's optimizer state, batch size and schedule, batches from the
    train windows of ``data`` / ``task`` cut by ``windows``), as resume-probe's CONTROL does. Raises LayoutError /
    DataError when neither can be built (no data for a run without a built-in task, ...).
    """
    from ckptaudit.tasks import TASK_FILE, load_task_spec

    spec = load_task_spec(ckpt_dir) if (Path(ckpt_dir) / TASK_FILE).is_file() else {}
    if spec.get("train"):
        return _time_own_run(ckpt_dir, ks, device)
    from ckptaudit.analyses.resume.conditions import (
        fresh_optimizer,
        probe_inputs_from_checkpoint,
        restored_optimizer,
    )

    inputs = probe_inputs_from_checkpoint(ckpt_dir, task=task, device=device, data=data, windows=windows, dtype=dtype)
    model = inputs.model
    if inputs.optimizer_state is not None:
        optimizer, scheduler = restored_optimizer(model, inputs)
        state = "the run's optimizer state and schedule"
    else:
        optimizer, scheduler = fresh_optimizer(model, inputs), None
        state = "a fresh optimizer (the checkpoint has no optimizer state)"
    before = _optimizer_step_count(optimizer) or 0

    def step(i: int) -> None:
        inputs.train_step(model, optimizer, i)
        if scheduler is not None:
            scheduler.step()

    seconds = _timed_steps(step, ks, device)
    after = _optimizer_step_count(optimizer)
    bs = inputs.run_values["batch_size"]
    return StepTiming(seconds, f"resume-probe's loop ({state}; batches from --data's train windows)",
                      int(bs["value"]), str(bs["source"]), None if after is None else after - before)


def _time_own_run(ckpt_dir: Any, ks: Sequence[int], device: str) -> StepTiming:
    """K steps of ``tasks.train.train_step`` (the run's own batches, clipping, scheduler) from a checkpoint written
    by ``tasks.train.train_run``."""
    from ckptaudit.tasks import TASK_FILE
    from ckptaudit.tasks.train import load_checkpoint, train_step

    state = load_checkpoint(ckpt_dir)
    state.model.to(device)
    for st in state.optimizer.state.values():  # AdamW keeps its step counter on the CPU unless capturable
        for key, val in st.items():
            if torch.is_tensor(val) and key != "step":
                st[key] = val.to(device)
    hp = state.spec["train"]
    before = _optimizer_step_count(state.optimizer) or 0

    def step(i: int) -> None:
        train_step(state.model, state.optimizer, state.scheduler, state.task, state.step + i,
                   int(hp["batch_size"]), int(hp["seed"]), hp.get("max_grad_norm"))  # fmt: skip

    seconds = _timed_steps(step, ks, device)
    after = _optimizer_step_count(state.optimizer)
    return StepTiming(seconds, f"the run's own trainer ({TASK_FILE}: its batches, clipping and scheduler)",
                      int(hp["batch_size"]), TASK_FILE, None if after is None else after - before)
