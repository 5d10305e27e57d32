"""Optimizer state by parameter name: Trainer optimizer.pt, Accelerate optimizer.bin, Lightning .ckpt.

A saved torch optimizer numbers its parameters with integers (consecutively across param_groups, in group
order); the names are not in the file unless the optimizer was built from ``named_parameters()``. This module
turns indices into names exactly or refuses (``OptimizerStateError``): moments attached to the wrong parameter
would silently poison every analysis downstream.

Without stored names, candidate splits of the model's ``named_parameters()`` (requires_grad, in order) into
groups are tried: one group with everything, and each historical ``Trainer.create_optimizer`` decay/no-decay rule
(group 0 = decay, group 1 = no decay). A candidate is accepted only when every group size matches and every
moment's shape equals its parameter's shape; several accepted candidates that disagree -> refused as ambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError, OptimizerStateError
from ckptaudit.io.torchload import safe_torch_load

__all__ = [
    "ParamState",
    "OptimizerState",
    "load_optimizer_state",
    "load_scheduler_state",
    "lr_history",
    "TRAINER_RULES",
    "NO_DECAY_PATTERNS",
]

ParamShapes = Sequence[tuple[str, tuple[int, ...]]]

# Per-parameter state entries that have the parameter's shape (Adam/AdamW, AMSGrad, SGD, RMSprop, Adadelta,
# Adagrad). Factored states (Adafactor's exp_avg_sq_row/col) are deliberately not shape-checked.
_SHAPED_STATE_KEYS = (
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "acc_delta",
    "sum",
)


@dataclass(frozen=True)
class ParamState:
    """Optimizer state of one named parameter.

    ``step`` is the optimizer's step count for this parameter (a float, as torch stores it) or None;
    ``exp_avg`` / ``exp_avg_sq`` are Adam's first and second moments with the parameter's shape (None for
    optimizers without them).
    """

    name: str
    group: int
    step: float | None
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class OptimizerState:
    """A checkpoint's optimizer state keyed by parameter name.

    ``mapping`` says how indices became names: "param_names" (stored by torch), "named-keys" (the file keys its
    state by name), "single-group", or "trainer:<rule>" (see ``TRAINER_RULES``). ``groups`` holds each param
    group's hyper-parameters without 'params'/'param_names'; ``names`` the parameter names per group in index
    order; ``state`` the parameters that have state (those that never got a gradient are absent); ``raw`` the
    loaded state dict, unmodified, for exact restoration.
    """

    source: Path
    mapping: str
    groups: tuple[dict, ...]
    names: tuple[tuple[str, ...], ...]
    state: dict[str, ParamState]
    raw: dict = field(repr=False)

    def group_of(self, name: str) -> int:
        """Index of the param group that holds parameter ``name`` (KeyError when the optimizer lacks it)."""
        for g, names in enumerate(self.names):
            if name in names:
                return g
        raise KeyError(f"parameter {name!r} is not in the optimizer state of {self.source}")

    def hyper(self, name: str) -> dict:
        """Hyper-parameters (lr, betas, eps, weight_decay, ...) of the group holding parameter ``name``."""
        return self.groups[self.group_of(name)]


# --------------------------------------------------------------------------------------------- loading


def _lightning_file(ckpt: Any) -> Path | None:
    """The single .ckpt file of a Lightning checkpoint (its optimizer and scheduler live inside it)."""
    if getattr(ckpt, "layout", None) != "lightning":
        return None
    path = Path(ckpt.path)
    if path.is_file():
        return path
    files = tuple(getattr(ckpt, "weight_files", ()) or ())
    return Path(files[0]) if files else None


def _stack_reader(ckpt: Any) -> Any:
    from ckptaudit.io.discover import stack_reader

    return stack_reader(getattr(ckpt, "layout", ""))


def _load_optimizer_dict(ckpt: Any) -> tuple[dict, Path]:
    """The plain optimizer state dict of ``ckpt`` and the file it came from."""
    path = getattr(ckpt, "optimizer_file", None) or _lightning_file(ckpt)
    if path is None:
        raise OptimizerStateError(
            f"{ckpt.path}: this checkpoint has no optimizer state",
            hint="save with the optimizer (Trainer: save_only_model=False; Accelerate: save_state)",
        )
    path = Path(path)
    reader = _stack_reader(ckpt)
    if reader is not None and hasattr(reader, "optimizer_dict"):
        loaded = reader.optimizer_dict(ckpt)
        if loaded is None:
            raise OptimizerStateError(f"{path}: this checkpoint has no optimizer state")
        return loaded, path
    from ckptaudit.io import deepspeed

    if deepspeed.is_engine_dir(path):  # a DeepSpeed engine checkpoint (ZeRO 0-3), e.g. in a Trainer checkpoint
        return deepspeed.optimizer_state_dict(path), path
    if path.is_dir() and (path / ".metadata").is_file():  # DCP: the optimizer subtree, keyed by name
        from ckptaudit.io.dcp import optimizer_state_dict

        return optimizer_state_dict(path), path
    if path.is_dir():  # FSDP sharded optimizer_0/ (DCP): moments are flattened per rank, not per index
        raise OptimizerStateError(
            f"{path}: a sharded (torch.distributed.checkpoint) optimizer state",
            hint="convert it to one file first (torch.distributed.checkpoint.format_utils.dcp_to_torch_save)",
        )
    loaded = safe_torch_load(path)
    if isinstance(loaded, dict) and "optimizer_states" in loaded:  # Lightning: one entry per optimizer
        states = loaded["optimizer_states"]
        if not isinstance(states, (list, tuple)):
            raise CorruptFileError(f"{path}: 'optimizer_states' must be a list, got {type(states).__name__}",
                                   hint="re-save the checkpoint with Lightning")
        if not states:
            raise OptimizerStateError(f"{path}: 'optimizer_states' is empty (saved without the optimizer)")
        loaded = states[0]
    elif isinstance(loaded, dict) and "state_dict" in loaded:  # Lightning save_weights_only=True
        raise OptimizerStateError(
            f"{path}: this checkpoint has no optimizer state (weights only)",
            hint="save with the optimizer (Lightning: save_weights_only=False)",
        )
    if not (isinstance(loaded, dict) and "state" in loaded and "param_groups" in loaded):
        keys = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise OptimizerStateError(
            f"{path}: not a torch optimizer state dict (expected 'state' and 'param_groups', found {keys})",
            hint="DeepSpeed/FSDP sharded optimizer states are not supported",
        )
    from ckptaudit.io.optimizer_schema import validate_optimizer_state

    validate_optimizer_state(loaded, path)  # the one place a state dict is read: its structure is checked here
    return loaded, path


# ---------------------------------------------------------------------------------- Trainer decay rules

# transformers 4.56 / 5.x Trainer.get_decay_parameter_names, applied to the lower-cased parameter name; the
# built-in training loop (tasks.train) groups its parameters by the same rule.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_RE_456 = [re.compile(p) for p in NO_DECAY_PATTERNS]


def _modules(params: ParamShapes) -> dict[str, dict[str, tuple[int, ...]]]:
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in params:
        prefix, _, leaf = name.rpartition(".")
        out.setdefault(prefix, {})[leaf] = tuple(shape)
    return out


def _norm_class_names(params: ParamShapes, kind: str) -> set[str]:
    """Names of parameters inside modules that look like normalisation layers, judged from shapes alone.

    Module classes are not known from names and shapes, so "layernorm-shaped" (a 1-D weight with a 1-D bias of
    the same shape: nn.LayerNorm) and "norm-shaped" (any module whose weight is 1-D: LayerNorm, RMSNorm,
    GroupNorm...) stand in for the Trainer's class lists. Linear/Conv1D/Embedding weights are never 1-D.
    """
    if kind == "none":
        return set()
    names: set[str] = set()
    for prefix, leaves in _modules(params).items():
        weight = leaves.get("weight")
        if weight is None or len(weight) != 1:
            continue
        if kind == "layernorm-shaped" and leaves.get("bias") != weight:
            continue
        names.update(f"{prefix}.{leaf}" if prefix else leaf for leaf in leaves)
    return names


def _no_decay_440(name: str) -> bool:
    return "bias" in name


def _no_decay_450(name: str) -> bool:
    lower = name.lower()
    return "bias" in name or "layernorm" in lower or "rmsnorm" in lower


def _no_decay_456(name: str) -> bool:
    lower = name.lower()
    return any(p.search(lower) for p in _RE_456)


# (rule id, name predicate, norm-module stand-in), most faithful first within each version: 4.56+ excludes
# exactly nn.LayerNorm; 4.40-4.50 excluded ALL_LAYERNORM_LAYERS, which model files extended with their RMSNorms.
TRAINER_RULES: tuple[tuple[str, Callable[[str], bool], str], ...] = (
    ("trainer:4.56+", _no_decay_456, "layernorm-shaped"),
    ("trainer:4.56+/norm-shaped", _no_decay_456, "norm-shaped"),
    ("trainer:4.56+/names-only", _no_decay_456, "none"),
    ("trainer:4.50", _no_decay_450, "norm-shaped"),
    ("trainer:4.50/layernorm-shaped", _no_decay_450, "layernorm-shaped"),
    ("trainer:4.50/names-only", _no_decay_450, "none"),
    ("trainer:4.40", _no_decay_440, "norm-shaped"),
    ("trainer:4.40/layernorm-shaped", _no_decay_440, "layernorm-shaped"),
    ("trainer:4.40/names-only", _no_decay_440, "none"),
)


def _candidates(params: ParamShapes, n_groups: int) -> list[tuple[str, tuple[tuple[str, ...], ...]]]:
    names = [n for n, _ in params]
    if n_groups == 1:
        return [("single-group", (tuple(names),))]
    if n_groups != 2:
        return []
    out = []
    for rule, no_decay, norm_kind in TRAINER_RULES:
        norm = _norm_class_names(params, norm_kind)
        excluded = {n for n in names if n in norm or no_decay(n)}
        out.append(
            (rule, (tuple(n for n in names if n not in excluded), tuple(n for n in names if n in excluded)))
        )
    # decay = every weight of dim >= 2 (nanoGPT's configure_optimizers and many training scripts)
    out.append(("decay:dim>=2", (tuple(n for n, s in params if len(s) >= 2), tuple(n for n, s in params if len(s) < 2))))
    return out


# ------------------------------------------------------------------------------------------ mapping


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _shape_mismatch(
    split: Sequence[Sequence[str]], groups: list[dict], state: dict, shapes: dict[str, tuple[int, ...]]
) -> str | None:
    """First reason why ``split`` cannot be the optimizer's layout, or None when it fits."""
    sizes = tuple(len(g["params"]) for g in groups)
    got = tuple(len(s) for s in split)
    if got != sizes:
        return f"group sizes {got} != optimizer's {sizes}"
    for names, group in zip(split, groups, strict=True):
        for name, index in zip(names, group["params"], strict=True):
            entry = state.get(index)
            if not isinstance(entry, dict):
                continue  # never got a gradient: allowed
            if name not in shapes:
                return f"{name!r} is not a parameter of the model"
            for key in _SHAPED_STATE_KEYS:
                value = entry.get(key)
                if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(shapes[name]):
                    return f"{name}: optimizer {key} shape {_fmt(value.shape)} != parameter shape {_fmt(shapes[name])}"
    return None


def _check_indices(groups: list[dict], state: dict, path: Path) -> None:
    seen: set = set()
    for g, group in enumerate(groups):
        if "params" not in group:
            raise OptimizerStateError(f"{path}: param_groups[{g}] has no 'params'")
        for index in group["params"]:
            if index in seen:
                raise OptimizerStateError(f"{path}: parameter index {index!r} appears in two param groups")
            seen.add(index)
    stray = [k for k in state if k not in seen]
    if stray:
        raise OptimizerStateError(f"{path}: state entries {stray[:5]} belong to no param group")


def _map_names(
    sd: dict, path: Path, params: ParamShapes | None, get_params: Callable[[], ParamShapes]
) -> tuple[str, tuple[tuple[str, ...], ...]]:
    """(mapping, names per group) for the state dict ``sd``; raises OptimizerStateError rather than guess."""
    groups, state = list(sd["param_groups"]), sd["state"]
    _check_indices(groups, state, path)

    named = [g.get("param_names") for g in groups]
    all_str_keys = all(isinstance(i, str) for g in groups for i in g["params"])
    if all(n is not None for n in named) or (all_str_keys and any(g["params"] for g in groups)):
        mapping = "param_names" if all(n is not None for n in named) else "named-keys"
        split = (
            tuple(tuple(n) for n in named)
            if mapping == "param_names"
            else tuple(tuple(g["params"]) for g in groups)
        )
        for g, (names, group) in enumerate(zip(split, groups, strict=True)):
            if len(names) != len(group["params"]):
                raise OptimizerStateError(
                    f"{path}: param_groups[{g}] has {len(names)} param_names for {len(group['params'])} params"
                )
        flat = [n for names in split for n in names]
        if len(set(flat)) != len(flat):
            raise OptimizerStateError(f"{path}: the stored parameter names are not unique")
        if params is not None:  # names are authoritative; the model only confirms them
            shapes = {n: tuple(s) for n, s in params}
            problem = _shape_mismatch(split, groups, state, shapes)
            if problem is not None:
                raise OptimizerStateError(f"{path}: stored param_names do not fit the model: {problem}")
        return mapping, split

    if params is None:
        params = get_params()
    params = [(n, tuple(s)) for n, s in params]
    shapes = dict(params)
    candidates = _candidates(params, len(groups))
    if not candidates:
        raise OptimizerStateError(
            f"{path}: {len(groups)} param groups without stored parameter names; only one group (all parameters) "
            "or the Trainer's two decay/no-decay groups can be mapped to names",
            hint="build the optimizer from model.named_parameters() so torch stores param_names",
        )
    fits: list[tuple[str, tuple[tuple[str, ...], ...]]] = []
    reasons: list[str] = []
    for rule, split in candidates:
        problem = _shape_mismatch(split, groups, state, shapes)
        if problem is None:
            fits.append((rule, split))
        else:
            reasons.append(f"{rule}: {problem}")
    if not fits:
        raise OptimizerStateError(
            f"{path}: optimizer state does not fit the model's parameters under any known grouping ("
            + "; ".join(reasons)
            + ")",
            hint="pass the parameters the optimizer was built from, or save with param_names (torch >= 2.6)",
        )
    distinct = {split for _, split in fits}
    if len(distinct) > 1:
        raise OptimizerStateError(
            f"{path}: ambiguous: rules {', '.join(rule for rule, _ in fits)} all fit but map parameters differently",
            hint="build the optimizer from model.named_parameters() so torch stores param_names",
        )
    return fits[0]


def _plain(value: Any) -> Any:
    """0-d tensors -> Python numbers so hyper-parameters compare and serialise simply."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return value.item()
    return value


def load_optimizer_state(ckpt: Any, params: ParamShapes | None = None) -> OptimizerState:
    """Load the optimizer state of ``ckpt`` (a Checkpoint) and key it by parameter name.

    ``params`` is the model's ``named_parameters()`` (requires_grad only, in order) as ``(name, shape)`` pairs;
    None builds them from the checkpoint's config.json on the meta device (only needed when the file stores no
    parameter names). Reads Trainer optimizer.pt, Accelerate optimizer.bin and Lightning ``optimizer_states[0]``,
    weights-only. Raises OptimizerStateError when indices cannot be mapped to names exactly.
    """
    reader = _stack_reader(ckpt)
    if params is not None and reader is not None and hasattr(reader, "optimizer_to_model"):
        # the stack keys its optimizer by its own parameter shapes: map it so, then re-lay it for the model
        return reader.optimizer_to_model(load_optimizer_state(ckpt), params)
    sd, path = _load_optimizer_dict(ckpt)

    def get_params() -> ParamShapes:
        from ckptaudit.io.models import param_shapes

        reader = _stack_reader(ckpt)
        if reader is not None and hasattr(reader, "param_shapes"):  # the stack's own names and shapes
            return reader.param_shapes(ckpt)
        return param_shapes(ckpt)

    mapping, names = _map_names(sd, path, params, get_params)
    groups = tuple(
        {k: _plain(v) for k, v in group.items() if k not in ("params", "param_names")}
        for group in sd["param_groups"]
    )
    state: dict[str, ParamState] = {}
    for g, (group_names, group) in enumerate(zip(names, sd["param_groups"], strict=True)):
        for name, index in zip(group_names, group["params"], strict=True):
            entry = sd["state"].get(index)
            if not isinstance(entry, dict):
                continue
            step = entry.get("step")
            state[name] = ParamState(
                name=name,
                group=g,
                step=None if step is None else float(_plain(step)),
                exp_avg=entry.get("exp_avg"),
                exp_avg_sq=entry.get("exp_avg_sq"),
            )
    return OptimizerState(source=path, mapping=mapping, groups=groups, names=names, state=state, raw=sd)


# ---------------------------------------------------------------------------------- scheduler, lr log


def load_scheduler_state(ckpt: Any) -> dict | None:
    """The LR scheduler's state dict (scheduler.pt / scheduler.bin / Lightning ``lr_schedulers[0]``), or None."""
    path = getattr(ckpt, "scheduler_file", None) or _lightning_file(ckpt)
    if path is None:
        return None
    from ckptaudit.io import deepspeed

    if deepspeed.is_engine_dir(Path(path)):
        return deepspeed.scheduler_state_dict(Path(path))
    if Path(path).is_dir() and (Path(path) / ".metadata").is_file():  # DCP: the lr_scheduler subtree
        from ckptaudit.io.dcp import scheduler_state_dict

        return scheduler_state_dict(path)
    loaded = safe_torch_load(Path(path))
    if not isinstance(loaded, dict):
        raise CorruptFileError(f"{path}: expected a scheduler state dict, found {type(loaded).__name__}")
    if "state_dict" in loaded or "lr_schedulers" in loaded:  # a Lightning .ckpt: one entry per scheduler
        schedulers = loaded.get("lr_schedulers")
        return schedulers[0] if schedulers else None
    return loaded


def _trainer_state(ckpt: Any) -> dict | None:
    method = getattr(ckpt, "trainer_state", None)
    if callable(method):
        return method()
    path = getattr(ckpt, "trainer_state_file", None)
    if path is None:
        return None
    from ckptaudit.io.jsonio import read_json

    return read_json(path)


def lr_history(ckpt: Any) -> list[tuple[int, float]]:
    """``[(step, learning_rate)]`` from trainer_state.json's log_history (training entries only); [] without it.

    trainer_state.json is untrusted input: a ``log_history`` that is null or not a list gives [], and entries
    that are not objects, or whose ``step`` is not an integer or whose ``learning_rate`` is not a number
    (null, text...), are skipped; the well-formed entries are still returned.
    """
    state = _trainer_state(ckpt)
    if not state or not isinstance(state, dict):
        return []
    history = state.get("log_history")
    if not isinstance(history, list):
        return []
    out: list[tuple[int, float]] = []
    for entry in history:
        if not isinstance(entry, dict) or "learning_rate" not in entry or "step" not in entry:
            continue
        step, lr = entry["step"], entry["learning_rate"]
        if isinstance(step, bool) or isinstance(lr, bool):
            continue
        try:
            out.append((int(step), float(lr)))
        except (TypeError, ValueError, OverflowError):
            continue
    return out
