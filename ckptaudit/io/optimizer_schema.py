"""The schema of a torch optimizer state dict, checked when one is read (``io/optimizer.py``).

An ``optimizer.pt`` that loads weights-only can still hold anything plain: ``state`` as a list, ``param_groups =
[5]``, a step count that is text, moments that are lists, ``state[i] = None``, ``betas = (2.0, -1.0)``. Each would
break an analysis far from the file. :func:`validate_optimizer_state` checks the structure once, where the state
dict is read, and raises :class:`CorruptFileError` naming the file and the entry:

- the top level is a dict with ``state`` (a dict) and ``param_groups`` (a non-empty list of dicts);
- each group's ``params`` is a list of parameter indices (ints in int64, not bools) or of names (strings), with
  ``param_names``, when present, a list of strings of the same length;
- each group's hyper-parameters, when present, satisfy torch's own constructor checks: ``lr`` >= 0, ``eps`` >= 0,
  ``weight_decay`` >= 0, ``betas`` two numbers in [0, 1), ``momentum`` and ``dampening`` finite >= 0, ``alpha`` (RMSprop)
  >= 0; a number may be a Python number or a one-element tensor; booleans are not numbers;
- ``state`` keys are indices or names as above, each entry a dict; ``step`` is a finite number >= 0 or a
  one-element tensor; the moment entries (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``,
  ``square_avg``, ``acc_delta``, ``sum``) are tensors (``momentum_buffer`` may be None, as SGD stores it before its
  first step).

Shapes are checked by name where indices are mapped to the model's parameters (``io/optimizer.py``): that check
names the parameter whose moment does not fit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ckptaudit.errors import CorruptFileError
from ckptaudit.io.numbers import fits_int64

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum")
_NONNEG = ("lr", "eps", "weight_decay", "momentum", "dampening", "alpha", "lr_decay", "initial_lr")
_FIX = "re-save the optimizer state from the training run (optimizer.state_dict())"


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number or a one-element tensor, else None."""
    import torch

    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.reshape(()).item())
    return None


def _key_ok(k: Any) -> bool:
    return (isinstance(k, int) and not isinstance(k, bool) and 0 <= k and fits_int64(k)) or isinstance(k, str)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def validate_optimizer_state(sd: Any, path: Path | str) -> None:
    """Check the optimizer state dict ``sd`` read from ``path`` against the module's schema (CorruptFileError)."""
    import torch

    def bad(where: str, problem: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: not a valid optimizer state: {where} {problem}", _FIX)

    if not isinstance(sd, dict):
        raise bad("the file", f"holds a {type(sd).__name__}, not a dict")
    state, groups = sd.get("state"), sd.get("param_groups")
    if not isinstance(state, dict):
        raise bad("'state'", f"must be a dict of parameter -> state, got {_describe(state)}")
    if not isinstance(groups, list) or not groups:
        raise bad("'param_groups'", f"must be a non-empty list of dicts, got {_describe(groups)}")
    for g, group in enumerate(groups):
        where = f"param_groups[{g}]"
        if not isinstance(group, dict):
            raise bad(where, f"must be a dict, got {_describe(group)}")
        params = group.get("params")
        if not isinstance(params, list) or not all(_key_ok(i) for i in params):
            raise bad(f"{where}['params']", f"must be a list of parameter indices or names, got {_describe(params)}")
        names = group.get("param_names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                                  or len(names) != len(params)):
            raise bad(f"{where}['param_names']", f"must be {len(params)} strings, got {_describe(names)}")
        for key in _NONNEG:
            if key in group and group[key] is not None:
                x = _number(group[key])
                if x is None or not math.isfinite(x) or x < 0:
                    raise bad(f"{where}['{key}']", f"must be a finite number >= 0, got {_describe(group[key])}")
        if "betas" in group:
            betas = group["betas"]
            values = [_number(b) for b in betas] if isinstance(betas, (list, tuple)) else []
            if len(values) != 2 or any(b is None or not 0.0 <= b < 1.0 for b in values):
                raise bad(f"{where}['betas']", f"must be two numbers in [0, 1), got {_describe(betas)}")
    for k, entry in state.items():
        where = f"state[{k!r}]"
        if not _key_ok(k):
            raise bad(where, "has a key that is neither a parameter index nor a name")
        if not isinstance(entry, dict):
            raise bad(where, f"must be a dict of state tensors, got {_describe(entry)}")
        if "step" in entry:
            x = _number(entry["step"])
            if x is None or not math.isfinite(x) or x < 0:
                raise bad(f"{where}['step']", f"must be a step count >= 0, got {_describe(entry['step'])}")
        for key in MOMENT_KEYS:
            if key not in entry or (key == "momentum_buffer" and entry[key] is None):
                continue
            value = entry[key]
            if not isinstance(value, torch.Tensor):
                raise bad(f"{where}['{key}']", f"must be a tensor, got {_describe(value)}")
