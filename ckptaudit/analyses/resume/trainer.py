"""resume-probe through the stack's own resume: ``transformers.Trainer.train(resume_from_checkpoint=CKPT)``.

Used when the checkpoint is a Trainer checkpoint (trainer_state.json, training_args.bin, optimizer and scheduler
state) and the run's training set is given as the Trainer indexed it (``--train-data``: one example per row, in
order). Every condition then runs inside a real Trainer built from the run's saved arguments, so the sampler, its
seed, the batches skipped on resume, the RNG state of rng_state.pth, the loss normalisation and gradient clipping
are the Trainer's own:

- CONTROL: the Trainer builds its optimizer and scheduler from the arguments and loads optimizer.pt and
  scheduler.pt itself, exactly as a user's resumed run does;
- RESET conditions: the same Trainer resumed from a shadow of the checkpoint folder without optimizer.pt and
  scheduler.pt, given a fresh optimizer of the saved class and hyper-parameters and a ``LambdaLR`` whose factor at
  resumed step k is the condition's lr multiplier.

The saved arguments are read as plain data (:mod:`ckptaudit.io.hyperparams`, never unpickled); only the fields
that shape the training arithmetic are passed on (``TRAINER_FIELDS``), and everything with a side effect is forced
off: no saving, no evaluation, no hub, no reporting, a temporary output folder. A callback evaluates the model at
the probe's eval steps and stops training after the probe's steps.

The Trainer is built once per probe and re-armed for each condition (:class:`TrainerLoop`): its set-up (arguments,
accelerator, callbacks, the output and shadow folders) is paid once, not per condition, and the checkpoint's weights
are not read again (the condition's model is a copy of the weights the probe loaded); every resumed step is the one a
Trainer built afresh takes, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["TRAINER_FIELDS", "TrainerLoop", "passed_fields", "trainer_arguments"]

# TrainingArguments fields that decide what an optimizer step computes (the rest is logging, saving, hub...).
TRAINER_FIELDS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
                  "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args",
                  "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs",
                  "seed", "data_seed", "train_sampling_strategy", "group_by_length", "length_column_name",
                  "dataloader_drop_last", "label_smoothing_factor", "average_tokens_across_devices",
                  "full_determinism", "bf16", "fp16")
_SHADOW_SKIP = {"optimizer.pt", "scheduler.pt", "optimizer.bin", "scheduler.bin"}


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return "__class__" not in value and all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def passed_fields(saved: dict, device: str) -> dict[str, Any]:
    """The fields of the saved arguments that the probe's Trainer is built with (TRAINER_FIELDS that this
    transformers knows, plain values only; mixed precision only on a GPU)."""
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    taken = {k: saved[k] for k in TRAINER_FIELDS if k in known and k in saved and _plain(saved[k])}
    if not str(device).startswith("cuda"):
        taken.pop("bf16", None)
        taken.pop("fp16", None)
    return taken


def trainer_arguments(saved: dict, output_dir: str, device: str) -> tuple[Any, dict[str, Any]]:
    """(TrainingArguments, the fields taken from ``saved``): the run's arithmetic, nothing with a side effect."""
    from transformers import TrainingArguments

    taken = passed_fields(saved, device)
    cuda = str(device).startswith("cuda")
    forced = dict(output_dir=output_dir, save_strategy="no", eval_strategy="no", logging_strategy="steps",
                  logging_steps=1, report_to=[], push_to_hub=False, disable_tqdm=True, use_cpu=not cuda,
                  dataloader_num_workers=0, load_best_model_at_end=False, log_level="error")
    return TrainingArguments(**{**taken, **forced}), taken


class _Rows(torch.utils.data.Dataset):
    """The training set as the Trainer indexes it: row i -> {"input_ids", "labels"} (int64)."""

    def __init__(self, rows: Sequence[np.ndarray]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(np.asarray(self.rows[i], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def _collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length rows (as ``default_data_collator``); right-pad shorter ones with label -100."""
    width = max(int(f["input_ids"].numel()) for f in features)
    ids = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = int(f["input_ids"].numel())
        ids[i, :n], labels[i, :n], mask[i, :n] = f["input_ids"], f["labels"], 1
    out = {"input_ids": ids, "labels": labels}
    if bool((mask == 0).any()):
        out["attention_mask"] = mask
    return out


@contextlib.contextmanager
def _quiet() -> Any:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class _Probe:
    """The probe's callback (a ``TrainerCallback``, made by :func:`_probe_callback`): records the lr of group 0 at
    each step's start and the logged training loss, calls ``on_step(k)`` after resumed step k and stops training
    after ``n`` steps. Re-armed per condition by :meth:`arm`."""

    def arm(self, start: int, n: int, on_step: Callable[[int], None]) -> None:
        self.start, self.n, self.on_step = start, n, on_step
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        if optimizer is not None:
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        k = int(state.global_step) - self.start
        self.on_step(k)
        if k >= self.n:
            control.should_training_stop = True
        return control


@functools.cache
def _trainer_class() -> type:
    """``transformers.Trainer`` whose resume takes the weights the model already holds: the probe loads the
    checkpoint's weights once and gives every condition a copy, so reading them again per condition is skipped;
    everything else of the resume (trainer_state.json, sampler and skipped batches, rng_state.pth, optimizer and
    scheduler state) is the Trainer's own."""
    from transformers import Trainer

    class ProbeTrainer(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            return None

    return ProbeTrainer


def _probe_callback() -> _Probe:
    from transformers import TrainerCallback

    class Probe(_Probe, TrainerCallback):
        pass

    return Probe()


@dataclasses.dataclass
class TrainerLoop:
    """Runs the probe's conditions inside ``transformers.Trainer`` (see the module docstring).

    ``ckpt_dir``: the checkpoint folder; ``saved_args``: the plain TrainingArguments fields; ``rows``: the training
    set, one example per row, in the order of the run's dataset; ``start_step``: the checkpoint's global step.

    One Trainer (its TrainingArguments, accelerator, dataset and callbacks), one output folder and one shadow folder
    serve every condition: before each ``train()`` the Trainer is re-armed as its constructor leaves it (the seed of
    ``args.seed`` set, the condition's model, optimizer and scheduler, a new TrainerControl), the way ``train()``
    itself re-arms for a ``model_init``; after it, every reference to the condition's model and optimizer is dropped.
    The resume itself (trainer_state.json, sampler and skipped batches, rng_state.pth, and for CONTROL optimizer.pt
    and scheduler.pt) is still ``train(resume_from_checkpoint=...)``'s own, per condition; the weights are the
    model's own (``model`` already holds the checkpoint's weights: :func:`_trainer_class`).
    """

    ckpt_dir: Path
    saved_args: dict
    rows: Sequence[np.ndarray]
    start_step: int
    device: str = "cpu"
    taken: dict = dataclasses.field(default_factory=dict)
    _trainer: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _probe: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _folders: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def _folder(self, kind: str) -> Path:
        """The output folder ("out", never written: saving is off) or the shadow of the checkpoint without its
        optimizer and scheduler state ("reset"), made once and removed with the loop (TemporaryDirectory)."""
        if kind not in self._folders:
            tmp = tempfile.TemporaryDirectory(prefix=f"ckptaudit-trainer-{kind}-")
            if kind == "reset":
                for p in Path(self.ckpt_dir).iterdir():
                    if p.name not in _SHADOW_SKIP:
                        os.symlink(p.resolve(), Path(tmp.name) / p.name)
            self._folders[kind] = tmp
        return Path(self._folders[kind].name)

    def _armed(self, model: nn.Module, optimizers: tuple[Any, Any]) -> Any:
        """The Trainer, holding ``model`` and ``optimizers`` as a new ``Trainer(model=model, optimizers=...)``
        would."""
        from transformers import TrainerControl
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from transformers.trainer_utils import enable_full_determinism, set_seed

        if self._trainer is None:
            args, self.taken = trainer_arguments(self.saved_args, str(self._folder("out")), self.device)
            self._probe = _probe_callback()
            self._trainer = _trainer_class()(model=model, args=args, train_dataset=_Rows(self.rows),
                                             data_collator=_collate, optimizers=optimizers, callbacks=[self._probe])
            for cb in (PrinterCallback, ProgressCallback):
                self._trainer.remove_callback(cb)
            return self._trainer
        trainer, args = self._trainer, self._trainer.args
        # What Trainer.__init__ does with a model: the seed first, then the model placed on the device.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if trainer.place_model_on_device:
            model.to(args.device)
        trainer.model = trainer.model_wrapped = model
        trainer.optimizer, trainer.lr_scheduler = optimizers
        trainer._created_lr_scheduler = False
        trainer.control = TrainerControl()
        trainer.current_flos = 0
        return trainer

    def _disarm(self) -> None:
        """Drop the Trainer's (and its accelerator's) references to the last condition's model and optimizer."""
        trainer = self._trainer
        trainer.accelerator.free_memory()
        trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
        handler = trainer.callback_handler
        handler.model = handler.optimizer = handler.lr_scheduler = handler.train_dataloader = None

    def __call__(self, control: bool, model: nn.Module, fresh: Callable[[nn.Module], torch.optim.Optimizer] | None,
                 multiplier: Callable[[int], float], n: int, on_step: Callable[[int], None]) -> tuple[list, list]:
        """Train ``model`` (already holding the checkpoint's weights) ``n`` steps; ``on_step(k)`` after resumed step k
        (1-based). Returns (training loss per step, lr of group 0 per step)."""
        with _quiet():
            optimizers: tuple[Any, Any] = (None, None)
            if not control:
                assert fresh is not None
                opt = fresh(model)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: multiplier(k))
                optimizers = (opt, sched)
            trainer = self._armed(model, optimizers)
            self._probe.arm(self.start_step, n, on_step)
            folder = self.ckpt_dir if control else self._folder("reset")
            with _frozen_heap():
                try:
                    trainer.train(resume_from_checkpoint=str(folder))
                finally:
                    self._disarm()
        return self._probe.losses[:n], self._probe.lrs[:n]


@contextlib.contextmanager
def _frozen_heap() -> Any:
    """Every object alive now left out of the garbage collector's passes while the Trainer runs: accelerate calls
    gc.collect() at the start of each train(), which walks the whole heap (the model, the data, the other
    conditions' results) every time; nothing created before is garbage, and what train() creates is collected
    as usual."""
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
