"""A deterministic training loop that writes Hugging Face Trainer run directories.

Each ``output_dir/checkpoint-{step}/`` holds what ``transformers.Trainer`` 5.x writes (FORMATS.md):
config.json, generation_config.json, model.safetensors (tied ``lm_head.weight`` absent), optimizer.pt,
scheduler.pt, rng_state.pth, trainer_state.json, training_args.bin, plus ``ckptaudit_task.json`` naming the
task, its data order and the training hyper-parameters, so the analyses of these runs need nothing from
training_args.bin (which ckptaudit reads only as plain data, never with torch.load).

The optimizer is built as ``Trainer.create_optimizer`` builds it (two AdamW groups, decay then no-decay, no
``param_names``), so optimizer.pt exercises the Trainer index -> name mapping. Unlike the Trainer a checkpoint
is also saved at step 0, the initial point of trajectory analyses.

The pieces are public because resume-probe and extrapolate continue training from a checkpoint:
``load_checkpoint`` rebuilds model/optimizer/scheduler from the files, ``train_step`` performs optimizer step
``step`` on the same batch the original run used.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ckptaudit.errors import LayoutError
from ckptaudit.io.optimizer import NO_DECAY_PATTERNS  # Trainer's decay rule (io reads optimizer files by it)
from ckptaudit.tasks import TASK_FILE, Task, load_task_spec, task_from_spec
from ckptaudit.tasks.data import loss_parts

SCHEDULER_KINDS = ("constant", "linear")
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
    TASK_FILE,
)

ProgressFn = Callable[[int, int, dict], None]


class StepStats(NamedTuple):
    """What one optimizer step reports: training loss (nats, before the update) and pre-clip gradient norm."""

    loss: float
    grad_norm: float


@dataclass
class TrainingState:
    """A model with its optimizer and scheduler, positioned after ``step`` optimizer steps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    task: Task
    spec: dict
    step: int


# -- determinism -------------------------------------------------------------------------------------------
@contextmanager
def deterministic() -> Iterator[None]:
    """Turn on ``torch.use_deterministic_algorithms`` for the block and restore the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, as ``transformers.set_seed`` does (without its CUDA side effects)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# -- model, optimizer, scheduler ---------------------------------------------------------------------------
def build_model(config: Any, seed: int | None) -> nn.Module:
    """A freshly initialised ``GPT2LMHeadModel`` in train mode.

    With a ``seed`` the initial weights depend on it alone (python, numpy and torch are seeded first); with
    None they come from torch's current RNG state.
    """
    from transformers import GPT2LMHeadModel

    if seed is not None:
        seed_everything(seed)
    model = GPT2LMHeadModel(config)
    model.train()
    return model


def _parameter_names(module: nn.Module, patterns: Sequence[re.Pattern]) -> list[str]:
    # Mirrors transformers.trainer_pt_utils.get_parameter_names: recurse through children, drop parameters of
    # nn.LayerNorm modules and names matching a pattern. Tied parameters appear under every owner here; the
    # caller walks named_parameters(), which lists each tensor once.
    result = []
    for name, child in module.named_children():
        for n in _parameter_names(child, patterns):
            full = f"{name}.{n}"
            if not isinstance(child, nn.LayerNorm) and not any(p.search(full.lower()) for p in patterns):
                result.append(full)
    result += [k for k in module._parameters if not any(p.search(k.lower()) for p in patterns)]
    return result


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay, by the rule of ``Trainer.get_decay_parameter_names`` 5.x."""
    return set(_parameter_names(model, [re.compile(p) for p in NO_DECAY_PATTERNS]))


def parameter_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decay names, no-decay names), each in ``named_parameters()`` order, ``requires_grad`` only."""
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the two parameter groups of ``Trainer.create_optimizer``.

    Group 0 = decay parameters (``weight_decay``), group 1 = no-decay parameters (0.0). Parameters are passed
    as plain tensors, not (name, tensor) pairs, so the state dict has no ``param_names`` — as the Trainer's.
    """
    params = dict(model.named_parameters())
    decay, no_decay = parameter_groups(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, kind: str = "linear"
) -> torch.optim.lr_scheduler.LambdaLR:
    """The Trainer's LambdaLR: linear warm-up from 0 over ``warmup_steps``, then constant or linear decay to 0.

    ``kind`` is "constant" (``get_constant_schedule_with_warmup``) or "linear"
    (``get_linear_schedule_with_warmup`` reaching 0 at ``total_steps``).
    """
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
    if kind == "linear":
        return get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
        )
    raise ValueError(f"unknown scheduler kind {kind!r}; expected one of {SCHEDULER_KINDS}")


# -- one step ----------------------------------------------------------------------------------------------
def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    task: Task,
    step: int,
    batch_size: int,
    seed: int,
    max_grad_norm: float | None = 1.0,
) -> StepStats:
    """Optimizer step number ``step`` (0-based: it takes the model from global step ``step`` to ``step + 1``).

    Uses ``task.batch("train", step, batch_size, seed)``, clips the gradient to ``max_grad_norm`` (None or
    <= 0: no clipping, the norm is still reported), steps the optimizer and then the scheduler, as the Trainer.
    A batch too large for memory accumulates its gradient over micro-batches (tasks.data.loss_parts).
    """
    model.train()
    batch = task.batch("train", step, batch_size, seed)
    optimizer.zero_grad(set_to_none=True)
    loss = None
    for part in loss_parts(task, model, batch):  # the whole batch, or micro-batches when it would not fit memory
        part.backward()
        loss = part.detach() if loss is None else loss + part.detach()
    clip = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepStats(float(loss.detach()), float(grad_norm))


# -- saving and loading ------------------------------------------------------------------------------------
def _trainer_state(**fields: Any) -> Any:
    from transformers import TrainerState

    return TrainerState(**fields)


def _training_args(out_dir: Path, hp: dict) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=hp["max_steps"],
        per_device_train_batch_size=hp["batch_size"],
        learning_rate=hp["lr"],
        weight_decay=hp["weight_decay"],
        adam_beta1=hp["betas"][0],
        adam_beta2=hp["betas"][1],
        adam_epsilon=hp["eps"],
        max_grad_norm=hp["max_grad_norm"] or 0.0,
        lr_scheduler_type="constant_with_warmup" if hp["scheduler"] == "constant" else "linear",
        warmup_steps=hp["warmup_steps"],
        logging_steps=hp["logging_steps"],
        save_steps=hp["save_steps"],
        eval_steps=hp["save_steps"],
        eval_strategy="steps",
        seed=hp["seed"],
        optim="adamw_torch_fused" if hp["fused"] else "adamw_torch",
        report_to=[],
        use_cpu=True,
    )


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: Any,
    task_spec: dict,
    training_args: Any | None = None,
) -> Path:
    """Write one Trainer-layout checkpoint directory (see the module docstring for its files)."""
    from transformers.utils import logging as hf_logging

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # save_pretrained draws a "Writing model shards" bar per call: dozens of them per run drown real progress.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(ckpt_dir, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt_dir / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    torch.save(rng, ckpt_dir / "rng_state.pth")
    if training_args is not None:
        torch.save(training_args, ckpt_dir / "training_args.bin")
    (ckpt_dir / TASK_FILE).write_text(
        json.dumps(task_spec, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    trainer_state.save_to_json(str(ckpt_dir / "trainer_state.json"))
    return ckpt_dir


def load_checkpoint(ckpt_dir: Path | str) -> TrainingState:
    """Rebuild model, optimizer and scheduler of a checkpoint written by ``train_run``, ready to continue.

    Weights come from model.safetensors, optimizer/scheduler state from optimizer.pt / scheduler.pt
    (``torch.load(weights_only=True)``), hyper-parameters and data order from ckptaudit_task.json.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    ckpt_dir = Path(ckpt_dir)
    spec = load_task_spec(ckpt_dir)
    hp = spec.get("train")
    if hp is None:
        raise LayoutError(f"{ckpt_dir / TASK_FILE} has no 'train' section", hint="regenerate the run")
    task = task_from_spec(spec)
    config = AutoConfig.from_pretrained(ckpt_dir)
    with torch.random.fork_rng(
        devices=[]
    ):  # the initial weights are overwritten: leave the caller's RNG alone
        model = build_model(config, seed=None)
    weights = load_file(ckpt_dir / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise LayoutError(
            f"{ckpt_dir / 'model.safetensors'} does not match config.json "
            f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})",
            hint="the checkpoint directory is inconsistent; regenerate it",
        )
    from ckptaudit.io.tensors import safe_torch_load  # weights-only, one-line errors for damaged files

    try:
        optimizer = build_optimizer(
            model, hp["lr"], hp["weight_decay"], tuple(hp["betas"]), hp["eps"], hp.get("fused")
        )
        scheduler = build_scheduler(optimizer, hp["warmup_steps"], hp["max_steps"], hp["scheduler"])
    except KeyError as e:
        raise LayoutError(f"{ckpt_dir / TASK_FILE}: the 'train' section lacks {e}", hint="regenerate the run") from None
    files = {name: ckpt_dir / name for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json")}
    for f in files.values():
        if not f.is_file():
            raise LayoutError(f"{f}: missing, so training cannot continue from this checkpoint",
                              hint="use a checkpoint written with its optimizer and scheduler state")
    # Fresh objects first, saved state second: building the LambdaLR over a restored optimizer would take the
    # scheduled lr for the base lr.
    try:
        optimizer.load_state_dict(safe_torch_load(files["optimizer.pt"]))
        scheduler.load_state_dict(safe_torch_load(files["scheduler.pt"]))
        step = int(json.loads(files["trainer_state.json"].read_text(encoding="utf-8"))["global_step"])
    except (ValueError, KeyError, TypeError) as e:
        raise LayoutError(f"{ckpt_dir}: optimizer, scheduler or trainer state does not fit the model ({e})",
                          hint="regenerate the checkpoint") from None
    return TrainingState(model, optimizer, scheduler, task, spec, step)


def checkpoint_dir(out_dir: Path | str, step: int) -> Path:
    """``out_dir/checkpoint-{step}``."""
    return Path(out_dir) / f"checkpoint-{step}"


# -- the run -----------------------------------------------------------------------------------------------
def train_run(
    out_dir: Path | str,
    task: Task,
    model_config: Any,
    steps: int,
    save_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    batch_size: int = 64,
    seed: int = 0,
    progress: ProgressFn | None = None,
    *,
    scheduler: str = "constant",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    logging_steps: int | None = None,
    fused: bool | None = None,
) -> Path:
    """Train ``steps`` optimizer steps and write checkpoints at step 0, every ``save_steps`` and at the end.

    ``seed`` fixes both the initial weights and the data order. ``logging_steps`` (default
    ``max(1, save_steps // 5)``) sets how often a training entry goes into ``log_history``; an evaluation entry
    (validation loss and accuracy) is added at every save. ``progress(step, steps, metrics)`` is called after
    every save. Returns ``out_dir``.
    """
    if steps < 1 or save_steps < 1:
        raise ValueError(f"need steps >= 1 and save_steps >= 1, got {steps}, {save_steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging_steps = logging_steps or max(1, save_steps // 5)
    hp = {
        "lr": lr, "weight_decay": weight_decay, "betas": list(betas), "eps": eps, "warmup_steps": warmup_steps,
        "max_steps": steps, "scheduler": scheduler, "max_grad_norm": max_grad_norm, "seed": seed,
        "batch_size": batch_size, "save_steps": save_steps, "logging_steps": logging_steps, "fused": fused,
        "optimizer": "AdamW",
    }  # fmt: skip
    spec = {**task.task_spec(batch_size=batch_size, data_seed=seed), "train": hp}
    steps_per_epoch = task.split_size("train") / batch_size
    args = _training_args(out_dir, hp)

    with deterministic():
        model = build_model(model_config, seed)
        optimizer = build_optimizer(model, lr, weight_decay, betas, eps, fused)
        sched = build_scheduler(optimizer, warmup_steps, steps, scheduler)
        state = _trainer_state(
            max_steps=steps, logging_steps=logging_steps, eval_steps=save_steps, save_steps=save_steps,
            train_batch_size=batch_size, num_train_epochs=math.ceil(steps / steps_per_epoch), log_history=[],
            stateful_callbacks={"TrainerControl": {"args": {
                "should_training_stop": False, "should_epoch_stop": False, "should_save": True,
                "should_evaluate": False, "should_log": False}, "attributes": {}}},
        )  # fmt: skip

        def save(global_step: int) -> None:
            val_loss, val_acc = task.evaluate(model, "validation")
            epoch = global_step / steps_per_epoch
            state.global_step, state.epoch = global_step, epoch
            state.log_history.append(
                {"eval_loss": val_loss, "eval_accuracy": val_acc, "epoch": epoch, "step": global_step}
            )
            save_checkpoint(checkpoint_dir(out_dir, global_step), model, optimizer, sched, state, spec, args)
            if progress is not None:
                progress(global_step, steps, {"eval_loss": val_loss, "eval_accuracy": val_acc})

        save(0)
        window: list[float] = []
        for step in range(steps):
            stats = train_step(model, optimizer, sched, task, step, batch_size, seed, max_grad_norm)
            window.append(stats.loss)
            global_step = step + 1
            if global_step % logging_steps == 0:
                state.log_history.append({
                    "loss": sum(window) / len(window), "grad_norm": stats.grad_norm,
                    "learning_rate": sched.get_last_lr()[0], "epoch": global_step / steps_per_epoch,
                    "step": global_step,
                })  # fmt: skip
                window = []
            if global_step % save_steps == 0 or global_step == steps:
                save(global_step)
    return out_dir
