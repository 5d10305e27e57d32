"""What the model-running commands build from their options (shared by the commands and ckptaudit.api):
the data, the precision, the regimes probe set, a trajectory of at least two checkpoints, integer lists and
cascade specs, the losses regimes classifies with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptaudit.cli.common import load_run
from ckptaudit.errors import LayoutError, UsageError


def task_data(ckpt: Any, task: str | None, data: Path | None, required: bool, windows: Any = None) -> Any:
    """The Task-protocol data of ``ckpt`` (None when not required and the checkpoint names none)."""
    from ckptaudit.tasks import TASK_FILE
    from ckptaudit.tasks.data import load_data

    if not required and task is None and data is None and not (ckpt.directory / TASK_FILE).is_file():
        return None
    return load_data(ckpt, task=task, data=data, windows=windows)


def precision_of(dtype: str, ckpt: Any, device: str) -> tuple[Any, dict]:
    from ckptaudit.io.precision import resolve_dtype

    torch_dtype, record = resolve_dtype(dtype, ckpt, device)
    return torch_dtype, record.to_json()


def probe_set(ckpt: Any, probes: Path | None, data: Any, seed: int) -> Any:
    from ckptaudit.analyses.regimes.run import build_probes

    return build_probes(ckpt.directory, ckpt.config(), probes, data, seed)


def trajectory_run(path: Path, steps: str | None = None, revisions: str | None = None) -> Any:
    run = load_run(path, steps, revisions)
    if len(run) < 2:
        raise LayoutError(f"{path}: {len(run)} checkpoint(s); trajectory analyses need at least 2", "pass a run directory")
    return run


def int_list(spec: str, option: str) -> tuple[int, ...]:
    from ckptaudit.io.numbers import is_int_text, parse_int

    parts = [x.strip() for x in spec.split(",") if x.strip()]
    if not parts or not all(is_int_text(x) for x in parts):
        raise UsageError(f"{option} {spec}: expected comma-separated integers", f"e.g. {option} 5,10,25")
    values = tuple(parse_int(x, option, hint=f"e.g. {option} 5,10,25") for x in parts)
    if min(values) < 1:
        raise UsageError(f"{option} {spec}: give positive integers", f"e.g. {option} 5,10,25")
    return values


def cascade_specs(specs: list[str]) -> tuple[tuple[int, int], ...]:
    out = []
    for spec in specs:
        from ckptaudit.io.numbers import is_int_text, parse_int

        d, _, k = (x.strip() for x in spec.partition(":"))
        if not (is_int_text(d) and is_int_text(k)):
            raise UsageError(f"--cascade {spec}: expected D:K", "e.g. --cascade 4:25")
        out.append((parse_int(d, "--cascade"), parse_int(k, "--cascade")))
        if out[-1][0] < 1 or out[-1][1] < 1:
            raise UsageError(f"--cascade {spec}: D and K must be positive", "e.g. --cascade 4:25")
    return tuple(out)


def regime_losses(run: Any, held_out: Any, data: Path | None, no_loss: bool) -> tuple[Any, Any, str]:
    """(evaluate, logged losses, source): the held-out validation loss evaluated per checkpoint when data is at hand,
    else the eval_loss that trainer_state.json logged at each checkpoint's step, else nothing."""
    from ckptaudit.analyses.regimes.signals import losses_from_log_history

    if no_loss:
        return None, None, "no loss: --no-loss"
    if held_out is not None:
        name = f"--data {data}" if data is not None else f"task {getattr(held_out, 'name', 'of the checkpoint')}"
        return (lambda m: float(held_out.evaluate(m, "validation")[0])), None, f"validation loss on {name}, evaluated at every checkpoint"
    for ckpt in reversed(list(run)):
        state = ckpt.trainer_state()
        if state and state.get("log_history"):
            logged = losses_from_log_history(state["log_history"], [c.step for c in run])
            if any(v is not None for v in logged):
                missing = sum(v is None for v in logged)
                return None, logged, ("eval_loss logged in trainer_state.json" +
                                      (f" ({missing} checkpoint(s) without one)" if missing else ""))
            break
    return None, None, ""
