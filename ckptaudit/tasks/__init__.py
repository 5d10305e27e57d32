"""Built-in training tasks: used by the fixture runs, the demo, the tests and the analyses that run a network.

A task is named and parameterised in a small JSON dict (its *spec*) written into every checkpoint it trains as
``ckptaudit_task.json``, so an analysis can rebuild the exact data a checkpoint was trained on::

    task = get_task("modadd", p=23)
    task = task_from_checkpoint_dir(run / "checkpoint-100")
    spec = load_task_spec(run / "checkpoint-100")      # also batch_size, data_seed, training hyper-parameters
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ckptaudit.errors import DataError
from ckptaudit.tasks.modadd import ModAdd

TASK_FILE = "ckptaudit_task.json"

__all__ = [
    "TASK_FILE",
    "ModAdd",
    "Task",
    "available_tasks",
    "get_task",
    "load_task_spec",
    "task_from_checkpoint_dir",
    "task_from_spec",
]


@runtime_checkable
class Task(Protocol):
    """What every built-in task provides (see ``ModAdd`` for the reference implementation)."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def seq_len(self) -> int: ...

    def split_size(self, split: str) -> int: ...

    def batch(self, split: str, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]: ...

    def batches(
        self, split: str, batch_size: int, seed: int, n: int, start: int = ...
    ) -> Iterator[dict[str, torch.Tensor]]: ...

    def eval_batches(self, split: str, batch_size: int = ...) -> Iterator[dict[str, torch.Tensor]]: ...

    def loss_and_accuracy(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, float]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, split: str = ...) -> tuple[float, float]: ...

    def model_config(
        self, n_layer: int = ..., n_embd: int = ..., n_head: int = ..., **overrides: Any
    ) -> Any: ...

    def task_spec(self, batch_size: int | None = None, data_seed: int | None = None) -> dict: ...


# name -> (factory, the spec keys the factory accepts)
_REGISTRY: dict[str, tuple[Callable[..., Task], tuple[str, ...]]] = {
    "modadd": (ModAdd, ("p", "train_frac", "split_seed")),
}


def available_tasks() -> list[str]:
    """Names accepted by ``get_task``."""
    return sorted(_REGISTRY)


def get_task(name: str, **params: Any) -> Task:
    """The built-in task ``name`` with ``params`` (e.g. ``get_task("modadd", p=47, train_frac=0.4)``).

    An unknown name, an unknown parameter or a value the task rejects (wrong type, out of range) raises
    DataError naming the task and the parameter.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise DataError(f"unknown built-in task {name!r}", hint=f"use one of: {', '.join(available_tasks())}")
    factory, accepted = _REGISTRY[name]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DataError(
            f"task {name!r} does not take parameter(s) {', '.join(unknown)}",
            hint=f"it accepts: {', '.join(accepted)}",
        )
    try:
        return factory(**params)
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"task {name!r}: {_culprit(factory, params)} rejected ({_first_line(exc)})",
            hint=f"{name} takes {', '.join(accepted)} as numbers in range (the defaults are used when omitted)",
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _culprit(factory: Callable[..., Any], params: dict[str, Any]) -> str:
    """The parameter(s) to name in a rejection: those whose type differs from the default's, else all given."""
    try:
        defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items()}
    except (TypeError, ValueError):
        defaults = {}
    bad = []
    for key, value in params.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if default is inspect.Parameter.empty or default is None:
            continue
        want = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) or not isinstance(value, want):
            bad.append(key)
    chosen = bad or list(params)
    if not chosen:
        return "its default parameters were"
    text = ", ".join(f"{k}={params[k]!r}" for k in chosen)
    return f"parameter {text} was" if len(chosen) == 1 else f"parameters {text} were"


def task_from_spec(spec: dict, source: Path | str | None = None) -> Task:
    """Rebuild a task from its spec dict; keys that describe the run (batch_size, data_seed, ...) are ignored.

    ``source`` (the file the spec was read from) is named at the start of any DataError.
    """
    if source is None:
        return _task_from_spec(spec)
    try:
        return _task_from_spec(spec)
    except DataError as exc:
        raise DataError(f"{source}: {exc.message}", hint=exc.hint) from None


def _task_from_spec(spec: dict) -> Task:
    if not isinstance(spec, dict):
        raise DataError(f"task spec must be a JSON object, got {type(spec).__name__}",
                        hint=f"expected a {TASK_FILE} written by ckptaudit")
    if "task" not in spec:
        raise DataError("task spec has no 'task' key", hint=f"expected a {TASK_FILE} written by ckptaudit")
    name = spec["task"]
    if not isinstance(name, str):
        raise DataError(f"task spec key 'task' must be a task name, got {name!r}",
                        hint=f"use one of: {', '.join(available_tasks())}")
    accepted = _REGISTRY.get(name, (None, ()))[1]
    return get_task(name, **{k: v for k, v in spec.items() if k in accepted})


def load_task_spec(path: Path | str) -> dict:
    """The parsed ``ckptaudit_task.json`` of a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / TASK_FILE
    if not file.is_file():
        raise DataError(
            f"{file} not found: this checkpoint does not name its built-in task",
            hint="give the evaluation data explicitly, or use a run written by fixtures/make_fixtures.py",
        )
    from ckptaudit.io.jsonio import read_json

    spec = read_json(file, expect=None, error=DataError, hint="regenerate the checkpoint")
    if not isinstance(spec, dict):
        raise DataError(
            f"{file} must hold a JSON object (e.g. {{\"task\": \"modadd\", \"p\": 23}}), "
            f"got {type(spec).__name__}",
            hint="regenerate the checkpoint",
        )
    return spec


def task_from_checkpoint_dir(path: Path | str) -> Task:
    """The task a checkpoint directory was trained on, rebuilt from its ``ckptaudit_task.json``."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / TASK_FILE
    return task_from_spec(load_task_spec(path), source=file)
