"""A checkpoint on disk turned into resume-probe's ProbeInputs, so that CONTROL repeats the run.

Which loop CONTROL runs in (``ProbeInputs.control_mode``):

- **Trainer resume** (``transformers.Trainer.train(resume_from_checkpoint=...)``, :mod:`.trainer`): a
  Trainer checkpoint (trainer_state.json, training_args.bin, optimizer and scheduler state) and ``train_data``, the
  run's training set as the Trainer indexed it. The Trainer's own sampler, schedule, RNG state and loss apply.
- **ckptaudit loop** otherwise: the run's optimizer state, its batch size, its schedule rebuilt from the recorded
  arguments with scheduler.pt loaded into it, its gradient clipping, and the RNG state of rng_state.pth restored
  before each condition; batches from ckptaudit's seeded sampler (for runs written by ckptaudit's own trainer, the
  run's own data order, so CONTROL repeats the run; for other runs the data order is ckptaudit's, and the report
  says so).

Every value and where it came from is listed in ``ProbeInputs.run_values``; ``batch_size`` given by the user wins.
The model is the one the run trained (``io.models.load_training_model``): for a PEFT LoRA checkpoint the base model
wrapped by PEFT with the checkpoint's adapter, only the adapter parameters trainable (``run_values`` /
``report["adapter"]`` say so), in either loop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ckptaudit.analyses.resume.conditions import (
    _NOT_HYPER,
    ProbeInputs,
    _checkpoint,
    _last_lrs,
    optimizer_class,
)
from ckptaudit.io.types import StoredCheckpoint

__all__ = ["probe_inputs_from_checkpoint"]

DEFAULT_BATCH_SIZE = 16


def _value(value: Any, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


def _read_rng_state(ckpt: StoredCheckpoint) -> dict | None:
    """rng_state.pth (the single-process file, else rank 0's) read weights-only with the numpy pieces the Trainer
    allow-lists; None when absent. Only the torch states are kept."""
    from ckptaudit.io.tensors import safe_torch_load

    files = sorted(ckpt.rng_files)
    if not files:
        return None
    chosen = next((f for f in files if Path(f).name == "rng_state.pth"), files[0])
    extra = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(module, fromlist=["_reconstruct"])
            extra.append(mod._reconstruct)
            break
        except (ImportError, AttributeError):
            continue
    state = safe_torch_load(chosen, extra_globals=extra)
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        return None
    out = {"cpu": state["cpu"], "file": str(chosen)}
    if state.get("cuda") is not None:
        out["cuda"] = state["cuda"]
    return out


def _trainer_schedule(hp: Any) -> tuple[Any, dict[str, Any]] | None:
    """A factory building the Trainer's scheduler (transformers.get_scheduler with the recorded arguments), and
    the values used, or None when the schedule is not recorded."""
    kind = hp.get("lr_scheduler_type")
    total = hp.get("max_steps")
    if kind is None or not total or int(total) <= 0:
        return None
    warm = int(hp.get("warmup", 0) or 0)
    kwargs = hp.get("lr_scheduler_kwargs") or {}

    def factory(optimizer: torch.optim.Optimizer) -> Any:
        from transformers import get_scheduler

        return get_scheduler(str(kind), optimizer=optimizer, num_warmup_steps=warm, num_training_steps=int(total),
                             scheduler_specific_kwargs=dict(kwargs))

    values = {"schedule": _value(str(kind), hp.source("lr_scheduler_type")),
              "warmup_steps": _value(warm, hp.source("warmup") or "default 0"),
              "max_steps": _value(int(total), hp.source("max_steps"))}
    return factory, values


def probe_inputs_from_checkpoint(
    path: Path | str,
    task: str | None = None,
    seed: int | None = None,
    device: str = "cpu",
    data: str | Path | None = None,
    lr: float | None = None,
    windows: Any = None,
    batch_size: int | None = None,
    dtype: str | None = None,
    train_data: str | Path | None = None,
) -> ProbeInputs:
    """Read checkpoint directory ``path`` into ProbeInputs (see the module docstring for how CONTROL is made).

    ``task`` / ``data`` / ``windows``: the data (tasks.data.load_data); ``train_data``: the run's training set as its
    trainer indexed it (tasks.data.load_rows). ``seed`` replaces the data seed; ``batch_size`` the run's batch size;
    ``dtype`` the precision (io.precision). Optimizer state is mapped to parameter names by io.optimizer (refused,
    naming the parameter, when it does not fit the model). A checkpoint without optimizer state yields inputs
    without it (RESET only) and a note.
    """
    from ckptaudit.analyses.resume.trainer import TrainerLoop, passed_fields
    from ckptaudit.io.hyperparams import run_hyperparameters
    from ckptaudit.io.models import load_training_model
    from ckptaudit.io.optimizer import load_optimizer_state, load_scheduler_state
    from ckptaudit.io.peft import base_model_path
    from ckptaudit.io.precision import resolve_dtype
    from ckptaudit.tasks import TASK_FILE, load_task_spec
    from ckptaudit.tasks.data import load_data, load_rows
    from ckptaudit.tasks.train import build_scheduler, parameter_groups, train_step

    ckpt = _checkpoint(Path(path))
    spec = load_task_spec(ckpt.directory) if (ckpt.directory / TASK_FILE).is_file() else {}
    own_run = bool(spec.get("train"))
    hp = run_hyperparameters(ckpt)
    notes: list[str] = [f"run record: {n}" for n in hp.notes]
    rows = load_rows(ckpt, train_data, windows) if train_data is not None else None
    if data is None and task is None and rows is not None:
        eval_data = load_data(ckpt, data=train_data, windows=windows)
        notes.append("evaluation windows are the last 10% of --train-data's windows, which the run trained on "
                     "(give --data for held-out text)")
    else:
        eval_data = load_data(ckpt, task=task, data=data, windows=windows)
    train_obj = rows if rows is not None else eval_data
    torch_dtype, precision = resolve_dtype(dtype, ckpt, device)
    model = load_training_model(ckpt, device=device, dtype=torch_dtype)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    values: dict[str, Any] = {}
    report: dict[str, Any] = {}
    if ckpt.layout == "peft":  # the adapter trains, the base stays frozen: as the run did
        trained = sum(math.prod(s) for _, s in params)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        values["parameters_trained"] = _value(f"{trained:,} in {len(params)} LoRA adapter tensors (base model "
                                              f"frozen: {frozen:,})", "adapter_config.json (PEFT)")
        report["adapter"] = {"kind": "lora", "base_model": str(base_model_path(ckpt)), "trainable_tensors": len(params),
                             "trainable_parameters": trained, "frozen_parameters": frozen}
        notes.append(f"a LoRA adapter run: resumed as the PeftModel it trained, {trained:,} adapter parameters train, "
                     "the base model is frozen; displacement and the start-weight hash cover the adapter parameters")

    opt_state = load_optimizer_state(ckpt, params) if ckpt.optimizer_file is not None else None
    sched_state = load_scheduler_state(ckpt) if ckpt.scheduler_file is not None else None
    own = dict(spec.get("train") or {})
    if opt_state is not None:
        names = opt_state.names
        raw_groups = opt_state.raw["param_groups"]
        cls = optimizer_class(raw_groups, own.get("optimizer"))
        hyper = tuple({k: v for k, v in g.items() if k not in _NOT_HYPER} for g in opt_state.groups)
        values["optimizer"] = _value(cls.__name__, f"{Path(opt_state.source).name} (param groups)")
    else:
        notes.append("provenance incomplete: the checkpoint has no optimizer state, so only RESET conditions can run "
                     "and the training state it came from cannot be reproduced")
        if hp.get("learning_rate") is None and sched_state is None:
            notes.append("hyper-parameters are not recorded; torch defaults are used for the fresh optimizer")
        decay, no_decay = parameter_groups(model)
        names = (tuple(decay), tuple(no_decay))
        cls = optimizer_class([], own.get("optimizer") or "AdamW")
        base = {"betas": (hp.get("adam_beta1", 0.9), hp.get("adam_beta2", 0.999)), "eps": hp.get("adam_epsilon", 1e-8)}
        hyper = ({**base, "weight_decay": hp.get("weight_decay", 0.0)}, {**base, "weight_decay": 0.0})
        raw_groups = None
        values["optimizer"] = _value(cls.__name__, "default (no optimizer state)")
    lr_hp = {"lr": own["lr"]} if "lr" in own else {}
    lrs, lr_source = _last_lrs(ckpt, raw_groups, sched_state, lr_hp, len(names), lr)
    hyper = tuple({**h, "lr": x} for h, x in zip(hyper, lrs, strict=True))
    values["lr_at_checkpoint"] = _value(lrs[0], lr_source)
    if opt_state is None:
        notes.append(f"RESET learning rate taken from {lr_source}")
    if all(x == 0 for x in lrs):
        notes.append("the lr in effect at the checkpoint is 0 (end of a decaying schedule): RESET conditions do not move")

    factory = None
    if own.get("scheduler") in ("constant", "linear"):
        def factory(optimizer: torch.optim.Optimizer) -> Any:
            return build_scheduler(optimizer, int(own["warmup_steps"]), int(own["max_steps"]), own["scheduler"])

        values.update(schedule=_value(own["scheduler"], TASK_FILE), warmup_steps=_value(own["warmup_steps"], TASK_FILE),
                      max_steps=_value(own["max_steps"], TASK_FILE))
    elif (made := _trainer_schedule(hp)) is not None:
        factory, sched_values = made
        values.update(sched_values)
    if opt_state is not None and sched_state is None:
        factory = None
        notes.append("no saved scheduler state: CONTROL holds the checkpoint's lr")
    elif opt_state is not None and factory is None:
        notes.append("the saved LR schedule is not recorded (no training_args.bin): CONTROL holds the checkpoint's lr")
        values["schedule"] = _value("held at the checkpoint's lr", "not recorded")

    recorded = hp.get("batch_size")
    if batch_size is not None:
        bs, bs_src = int(batch_size), "--batch-size"
    elif spec.get("batch_size") or own.get("batch_size"):
        bs, bs_src = int(own.get("batch_size") or spec["batch_size"]), TASK_FILE
    elif recorded:
        bs, bs_src = int(recorded), hp.source("batch_size")
    else:
        bs, bs_src = DEFAULT_BATCH_SIZE, f"default {DEFAULT_BATCH_SIZE} (not recorded; give --batch-size)"
        notes.append(f"the run's batch size is not recorded: {DEFAULT_BATCH_SIZE} sequences per step (--batch-size sets it)")
    values["batch_size"] = _value(bs, bs_src)
    clip = hp.get("max_grad_norm")
    max_grad_norm = float(clip) if clip is not None else 1.0
    values["max_grad_norm"] = _value(max_grad_norm, hp.source("max_grad_norm") or "default 1.0 (not recorded)")
    data_seed = int(seed if seed is not None else spec.get("data_seed", own.get("seed", 0)))
    rng = _read_rng_state(ckpt)
    values["rng_state"] = _value("restored" if rng else "seeded with --seed",
                                 Path(rng["file"]).name if rng else "no rng_state.pth")
    start = int(ckpt.step)

    loop, mode, max_steps = None, "ckptaudit loop", None
    trainer_files = hp.training_args is not None and ckpt.trainer_state_file is not None and opt_state is not None
    if rows is not None and trainer_files and not own_run:
        loop = TrainerLoop(ckpt.directory, hp.training_args, [rows.windows.ids(int(w)) for w in rows.train], start,
                           device=str(device))
        mode = "Trainer resume"
        total = hp.get("max_steps")
        max_steps = int(total) - start if total else None
        values["data_order"] = _value("the Trainer's sampler over --train-data's rows", "transformers.Trainer")
        values["trainer_arguments"] = _value(passed_fields(hp.training_args, str(device)), "training_args.bin")
        values["batch_size"] = _value(hp.get("batch_size"), hp.source("batch_size") or "training_args.bin")
        if batch_size is not None:
            notes.append("--batch-size is ignored under the Trainer's resume: the Trainer uses the run's own")
    elif own_run:
        values["data_order"] = _value(f"the run's own (seed {data_seed})", TASK_FILE if seed is None else "--seed")
    else:
        values["data_order"] = _value(f"ckptaudit's seeded sampler over the train windows (seed {data_seed})",
                                      "--seed" if seed is not None else "default")
        if hp.training_args is not None and rows is None:
            notes.append("CONTROL runs ckptaudit's loop with the run's optimizer state, batch size, schedule and RNG "
                         "state, but not the run's data order: give the training set as the Trainer indexed it "
                         "(--train-data) for the Trainer's own resume")

    def step_fn(m: nn.Module, optimizer: torch.optim.Optimizer, k: int) -> float:
        # The run's own step function, scheduler left to the probe: identical arithmetic to the original run.
        return train_step(m, optimizer, None, train_obj, start + k, bs, data_seed, max_grad_norm).loss

    def evaluate(m: nn.Module) -> tuple[float, float]:
        return eval_data.evaluate(m, "validation")

    report["precision"] = precision.to_json()
    if precision.note():
        notes.append(precision.note())
    if hasattr(eval_data, "selection"):
        report["eval_data"] = eval_data.selection()
    if rows is not None:
        report["train_data"] = rows.selection()
    elif hasattr(train_obj, "selection"):
        report["train_data"] = train_obj.selection()
    return ProbeInputs(
        model=model, group_names=tuple(tuple(n) for n in names), group_hyper=hyper, optimizer_cls=cls,
        train_step=step_fn, evaluate=evaluate, start_step=start,
        optimizer_state=opt_state.raw if opt_state is not None else None, scheduler_state=sched_state,
        scheduler_factory=factory, source=str(ckpt.path), task=getattr(eval_data, "name", str(task)), notes=notes,
        checkpoint=ckpt, loop=loop, rng_state=rng, run_values=values, control_mode=mode, max_steps=max_steps,
        report=report, chance_accuracy=(1.0 / eval_data.num_classes) if getattr(eval_data, "num_classes", 0) else None,
    )  # fmt: skip
