"""Inputs of resume-probe: a checkpoint turned into a model, its optimizer/scheduler state and its data.

``probe_inputs_from_checkpoint`` reads one checkpoint directory (Trainer layout: config.json, model.safetensors,
optimizer.pt, scheduler.pt, trainer_state.json, and for the project's own runs ckptaudit_task.json) into a
``ProbeInputs``: everything ``analyses.resume.run_resume_probe`` needs and nothing about files. Callers with
their own data pipeline (e.g. a run written by ``transformers.Trainer``) build ``ProbeInputs`` directly.

Optimizers are rebuilt here, in two ways (SPEC §3):
- ``restored_optimizer``: same class, the saved param groups and the saved state loaded with
  ``Optimizer.load_state_dict`` (moments, step counts, hyper-parameters, bit for bit), plus the saved scheduler
  rebuilt by ``scheduler_factory`` and restored with its ``load_state_dict``;
- ``fresh_optimizer``: same class and the saved hyper-parameters, empty state; its lr is set by the probe
  every step (no scheduler object).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptaudit.errors import InputNotFoundError, LayoutError, OptimizerStateError
from ckptaudit.io.types import StoredCheckpoint

__all__ = [
    "ProbeInputs",
    "fresh_optimizer",
    "optimizer_class",
    "probe_inputs_from_checkpoint",
    "restored_optimizer",
]

# Keys of a saved param group that describe the group, not a hyper-parameter to pass to a fresh optimizer:
# 'initial_lr' in particular would make a new LambdaLR take the old base lr.
_NOT_HYPER = ("params", "param_names", "initial_lr")

StepFn = Callable[[nn.Module, torch.optim.Optimizer, int], float]
EvalFn = Callable[[nn.Module], tuple[float, float]]


@dataclass
class ProbeInputs:
    """Everything resume-probe needs to continue training from one checkpoint.

    model: the model at the checkpoint (the probe deep-copies it per condition; it is never trained itself).
    group_names: parameter names per optimizer param group, in index order (the saved optimizer's layout).
    group_hyper: hyper-parameters per group (lr = the lr in effect at the checkpoint).
    optimizer_cls: the optimizer class. optimizer_state: the saved state dict, or None (RESET only).
    scheduler_state / scheduler_factory: the saved LR scheduler state and a function that builds a scheduler
    of the saved kind over an optimizer (None: the schedule is unknown, CONTROL holds the saved lr).
    train_step(model, optimizer, k): resumed step k (0-based; global step start_step + k): zero grads, forward,
    backward, clip, ``optimizer.step()``; returns the training loss. It must not step a scheduler.
    evaluate(model) -> (loss in nats, accuracy in [0, 1]) on the held-out split.
    loop: when set, it trains instead of ``train_step`` (the Trainer's own resume). rng_state: restored before
    every condition (else torch is seeded with the probe's seed). run_values: each value that makes CONTROL the
    run (batch size, schedule, ...) with the file it came from.
    """

    model: nn.Module
    group_names: tuple[tuple[str, ...], ...]
    group_hyper: tuple[dict, ...]
    optimizer_cls: type
    train_step: StepFn
    evaluate: EvalFn
    start_step: int = 0
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None
    source: str = ""
    task: str = ""
    notes: list[str] = field(default_factory=list)
    checkpoint: Any = None  # the io Checkpoint it came from (for the report's /inputs), when read from files
    loop: Any = None  # a TrainerLoop: every condition runs inside transformers.Trainer (analyses.resume.trainer)
    rng_state: dict | None = None  # {"cpu": ByteTensor, "cuda": [...]} of rng_state.pth, restored per condition
    run_values: dict = field(default_factory=dict)  # name -> {"value", "source"}: how CONTROL repeats the run
    control_mode: str = "ckptaudit loop"
    max_steps: int | None = None  # resumed steps the run's schedule allows (Trainer: max_steps - start)
    report: dict = field(default_factory=dict)  # precision, data selection, ... (copied into the report)
    chance_accuracy: float | None = None  # accuracy of guessing (1 / classes of a built-in task), when known


# ------------------------------------------------------------------------------------------ optimizers


def optimizer_class(groups: Sequence[dict], declared: str | None = None) -> type:
    """The torch optimizer class that wrote param groups ``groups`` (or the class named ``declared``).

    Adam-family groups carry 'betas' (torch >= 2.6 also 'decoupled_weight_decay': True for AdamW); SGD groups
    carry 'momentum' and 'nesterov'. Anything else is refused: a wrong class would make the RESET condition
    mean something else than the run's optimizer.
    """
    if declared:
        cls = getattr(torch.optim, str(declared), None)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            return cls
        raise OptimizerStateError(
            f"optimizer {declared!r} is not a torch.optim class", hint="use AdamW, Adam or SGD"
        )
    first = dict(groups[0]) if groups else {}
    if "betas" in first:
        # Before torch 2.6 Adam and AdamW groups were indistinguishable; AdamW is what Trainer and most LM runs use.
        return torch.optim.Adam if first.get("decoupled_weight_decay") is False else torch.optim.AdamW
    if "momentum" in first and "nesterov" in first:
        return torch.optim.SGD
    raise OptimizerStateError(
        f"cannot tell which optimizer wrote param groups with keys {sorted(first)}",
        hint="resume-probe rebuilds AdamW, Adam and SGD",
    )


def _constructor_kwargs(cls: type, hyper: dict) -> dict:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    return {k: v for k, v in hyper.items() if k in accepted}


def _named_groups(model: nn.Module, inputs: ProbeInputs, hyper: Sequence[dict]) -> list[dict]:
    params = dict(model.named_parameters())
    groups = []
    for g, (names, h) in enumerate(zip(inputs.group_names, hyper, strict=True)):
        missing = [n for n in names if n not in params]
        if missing:
            raise OptimizerStateError(
                f"optimizer param group {g} names parameter(s) the model lacks: {', '.join(missing[:5])}",
                hint="the optimizer state does not belong to these weights",
            )
        groups.append(
            {**{k: v for k, v in h.items() if k not in _NOT_HYPER}, "params": [params[n] for n in names]}
        )
    return groups


def restored_optimizer(model: nn.Module, inputs: ProbeInputs) -> tuple[torch.optim.Optimizer, Any]:
    """CONTROL: the saved optimizer state and scheduler restored exactly over ``model``'s parameters.

    Fresh objects first, saved state second (as ``Trainer._load_optimizer_and_scheduler``): a LambdaLR built over
    a restored optimizer would take the scheduled lr for its base lr.
    """
    if inputs.optimizer_state is None:
        raise OptimizerStateError(f"{inputs.source}: no optimizer state to restore")
    groups = _named_groups(model, inputs, inputs.group_hyper)
    optimizer = inputs.optimizer_cls(groups, **_constructor_kwargs(inputs.optimizer_cls, groups[0]))
    scheduler = inputs.scheduler_factory(optimizer) if inputs.scheduler_factory is not None else None
    try:
        optimizer.load_state_dict(inputs.optimizer_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise OptimizerStateError(
            f"{inputs.source}: saved optimizer state cannot be restored ({exc})"
        ) from None
    if scheduler is not None and inputs.scheduler_state is not None:
        scheduler.load_state_dict(inputs.scheduler_state)
    return optimizer, scheduler


def fresh_optimizer(model: nn.Module, inputs: ProbeInputs) -> torch.optim.Optimizer:
    """RESET: a new optimizer of the saved class with the saved hyper-parameters and empty state."""
    groups = _named_groups(model, inputs, inputs.group_hyper)
    return inputs.optimizer_cls(groups, **_constructor_kwargs(inputs.optimizer_cls, groups[0]))


# ------------------------------------------------------------------------------------------ checkpoints


def _checkpoint(path: Path) -> StoredCheckpoint:
    """The one Checkpoint at ``path`` (io.discover); a run of several is refused."""
    from ckptaudit.io.discover import discover_run

    if not path.exists():
        raise InputNotFoundError(f"{path}: no such checkpoint", hint="pass a checkpoint directory (checkpoint-N/)")
    run = discover_run(path)
    if len(run.checkpoints) != 1:
        raise LayoutError(
            f"{path}: holds {len(run.checkpoints)} checkpoints; resume-probe starts from one",
            hint="pass one checkpoint directory, e.g. run/checkpoint-1000",
        )
    return run.checkpoints[0]


def _last_lrs(
    ckpt: StoredCheckpoint, opt_groups: Sequence[dict] | None, sched: dict | None, hp: dict, n: int, lr: float | None = None
) -> tuple[list, str]:
    """The lr in effect at the checkpoint, per group, and where it came from (``lr`` given by the user wins)."""
    if lr is not None:
        return [float(lr)] * n, "--lr"
    if opt_groups:
        return [float(g["lr"]) for g in opt_groups], "optimizer state"
    if sched and sched.get("_last_lr"):
        lrs = [float(x) for x in sched["_last_lr"]]
        return (lrs + lrs[-1:] * n)[:n], "scheduler.pt"
    from ckptaudit.io.optimizer import lr_history

    history = lr_history(ckpt)
    if history:
        return [history[-1][1]] * n, f"trainer_state.json (logged at step {history[-1][0]})"
    if "lr" in hp:
        return [float(hp["lr"])] * n, "ckptaudit_task.json (peak lr)"
    raise OptimizerStateError(
        f"{ckpt.path}: no optimizer state and no record of the learning rate",
        hint="pass the base learning rate with $lr (or keep trainer_state.json / ckptaudit_task.json with the checkpoint)",
        param="lr",
    )


def probe_inputs_from_checkpoint(*args: Any, **kwargs: Any) -> ProbeInputs:
    """Read a checkpoint directory into ProbeInputs: :func:`ckptaudit.analyses.resume.inputs.probe_inputs_from_checkpoint`."""
    from ckptaudit.analyses.resume.inputs import probe_inputs_from_checkpoint as read

    return read(*args, **kwargs)
