"""The training run's hyper-parameters as its checkpoint records them, each with the file it came from.

:func:`run_hyperparameters` reads, in this order (a later file fills only what the earlier ones lack):

- ``trainer_state.json`` (Trainer): ``train_batch_size`` (examples per device step), ``max_steps``,
  ``num_train_epochs``, ``global_step``, ``logging_steps``, ``eval_steps``, ``save_steps``;
- ``training_args.bin`` (Trainer: a pickled ``TrainingArguments``), read only through
  :func:`ckptaudit.io.plainpickle.load_plain` with the ``transformers.`` / ``accelerate.`` prefixes allowed, so no
  code of the file runs: learning rate, schedule (``lr_scheduler_type``, ``lr_scheduler_kwargs``,
  ``warmup_steps``, ``warmup_ratio``), optimizer settings, ``max_grad_norm``, batch size per device,
  ``gradient_accumulation_steps``, seeds, the sampler (``train_sampling_strategy``, ``group_by_length``), precision;
- ``ckptaudit_task.json`` (runs written by ckptaudit's own trainer): its ``train`` section.

Derived: ``batch_size`` = examples per optimizer step (trainer_state.json's ``train_batch_size`` x
``gradient_accumulation_steps``, or the recorded batch size) and ``warmup`` (steps of linear warm-up: ``warmup_steps``
when positive, else ``ceil(warmup_ratio * max_steps)``, as the Trainer computes it).

A file that cannot be read is not an error here: the value is absent and ``notes`` says why (the commands that
need the value say what is missing and how to give it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.errors import CkptAuditError
from ckptaudit.io.jsonio import read_json

__all__ = ["TRAINING_ARGS_FILE", "HyperValue", "RunHyperparameters", "read_training_args", "recorded_eval_losses",
           "run_hyperparameters"]

TRAINING_ARGS_FILE = "training_args.bin"
TRAINING_ARGS_ALLOW = ("transformers.", "accelerate.")
_STATE_KEYS = ("train_batch_size", "max_steps", "num_train_epochs", "global_step", "logging_steps", "eval_steps",
               "save_steps")
_ARGS_KEYS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
              "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
              "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed",
              "data_seed", "train_sampling_strategy", "group_by_length", "dataloader_drop_last",
              "label_smoothing_factor", "bf16", "fp16", "average_tokens_across_devices")
# ckptaudit_task.json's train section -> the Trainer's names.
_TASK_KEYS = {"lr": "learning_rate", "weight_decay": "weight_decay", "eps": "adam_epsilon", "warmup_steps": "warmup_steps",
              "max_steps": "max_steps", "scheduler": "lr_scheduler_type", "max_grad_norm": "max_grad_norm",
              "seed": "seed", "batch_size": "batch_size"}


@dataclass(frozen=True)
class HyperValue:
    """One hyper-parameter: its value (plain JSON data) and where it was read (a file name, or a derivation)."""

    value: Any
    source: str


@dataclass(frozen=True)
class RunHyperparameters:
    """The hyper-parameters found (name -> HyperValue), the plain TrainingArguments dict (or None), and notes on
    files that were present but unreadable."""

    values: dict[str, HyperValue]
    training_args: dict | None = None
    notes: tuple[str, ...] = field(default=())

    def get(self, name: str, default: Any = None) -> Any:
        """The value of ``name``, or ``default`` when not recorded."""
        hv = self.values.get(name)
        return default if hv is None or hv.value is None else hv.value

    def source(self, name: str) -> str | None:
        """Where ``name`` was read, or None."""
        hv = self.values.get(name)
        return None if hv is None else hv.source

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{name: {"value": ..., "source": ...}}`` in a stable order."""
        return {k: {"value": v.value, "source": v.source} for k, v in sorted(self.values.items())}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if k != "__class__"}
    return str(value)


def read_training_args(path: Path | str) -> dict:
    """The fields of a ``training_args.bin`` as a plain dict, read by ``load_plain`` (no code of the file runs);
    CkptAuditError (UnsafePickleError / CorruptFileError) when refused or unreadable."""
    from ckptaudit.io.plainpickle import load_plain

    plain = load_plain(path, TRAINING_ARGS_ALLOW, "TrainingArguments")
    if not isinstance(plain, dict):
        from ckptaudit.errors import CorruptFileError

        raise CorruptFileError(f"{path}: not a pickled TrainingArguments object", hint="re-save it from the Trainer")
    return plain


def run_hyperparameters(ckpt: Any) -> RunHyperparameters:
    """The hyper-parameters recorded with checkpoint ``ckpt`` (see the module docstring)."""
    values: dict[str, HyperValue] = {}
    notes: list[str] = []
    directory = Path(ckpt.directory)

    def put(name: str, value: Any, source: str) -> None:
        if value is not None and name not in values:
            values[name] = HyperValue(_jsonable(value), source)

    state = None
    try:
        state = ckpt.trainer_state() if hasattr(ckpt, "trainer_state") else None
    except CkptAuditError as exc:
        notes.append(f"trainer_state.json unreadable: {exc.message}")
    if isinstance(state, dict):
        for key in _STATE_KEYS:
            value = state.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                put(key, value, "trainer_state.json")
    args = None
    args_file = directory / TRAINING_ARGS_FILE
    if args_file.is_file():
        try:
            args = read_training_args(args_file)
        except CkptAuditError as exc:
            notes.append(f"{TRAINING_ARGS_FILE} not read: {exc.message}")
    if args is not None:
        for key in _ARGS_KEYS:
            put(key, args.get(key), TRAINING_ARGS_FILE)
    task_file = directory / "ckptaudit_task.json"
    if task_file.is_file():
        try:
            train = read_json(task_file).get("train") or {}
        except (CkptAuditError, AttributeError):
            train = {}
        if isinstance(train, dict):
            for key, name in _TASK_KEYS.items():
                put(name, train.get(key), "ckptaudit_task.json")
            betas = train.get("betas")
            if isinstance(betas, list) and len(betas) == 2:
                put("adam_beta1", betas[0], "ckptaudit_task.json")
                put("adam_beta2", betas[1], "ckptaudit_task.json")
    _derive(values)
    return RunHyperparameters(values, args, tuple(notes))


def _derive(values: dict[str, HyperValue]) -> None:
    def num(name: str) -> float | None:
        hv = values.get(name)
        v = None if hv is None else hv.value
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if "batch_size" not in values:
        per_step, accum = num("train_batch_size"), num("gradient_accumulation_steps") or 1.0
        if per_step is not None:
            src = "trainer_state.json train_batch_size"
            if "gradient_accumulation_steps" in values:
                src += f" x {values['gradient_accumulation_steps'].source} gradient_accumulation_steps"
            values["batch_size"] = HyperValue(int(per_step * accum), src)
        elif num("per_device_train_batch_size") is not None:
            values["batch_size"] = HyperValue(int(num("per_device_train_batch_size") * accum),
                                              f"{TRAINING_ARGS_FILE} per_device_train_batch_size x "
                                              "gradient_accumulation_steps (one device)")
    warm, ratio, total = num("warmup_steps"), num("warmup_ratio"), num("max_steps")
    if warm is not None and warm >= 1:
        values["warmup"] = HyperValue(int(warm), values["warmup_steps"].source)
    elif warm is not None and 0 < warm < 1 and total:  # transformers 5 also takes a ratio in warmup_steps
        values["warmup"] = HyperValue(math.ceil(warm * total), f"{values['warmup_steps'].source} ratio x max_steps")
    elif ratio and total:
        values["warmup"] = HyperValue(math.ceil(ratio * total), f"{values['warmup_ratio'].source} warmup_ratio x max_steps")
    elif warm is not None:
        values["warmup"] = HyperValue(int(warm), values["warmup_steps"].source)


def recorded_eval_losses(ckpt: Any) -> list[tuple[int, float]]:
    """``[(step, eval_loss)]`` logged in the checkpoint's trainer_state.json (evaluation entries with a finite
    number), in log order; [] without them. trainer_state.json is untrusted: malformed entries are skipped."""
    try:
        state = ckpt.trainer_state() if hasattr(ckpt, "trainer_state") else None
    except CkptAuditError:
        return []
    history = state.get("log_history") if isinstance(state, dict) else None
    out: list[tuple[int, float]] = []
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict):
            continue
        step, loss = entry.get("step"), entry.get("eval_loss")
        if isinstance(step, bool) or isinstance(loss, bool) or not isinstance(step, int):
            continue
        if isinstance(loss, (int, float)) and math.isfinite(float(loss)):
            out.append((step, float(loss)))
    return out
