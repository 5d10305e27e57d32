"""Provenance of a run: what each checkpoint holds beyond its weights, and whether its files are safe to load.

A checkpoint is a complete artifact only with its Level-2 state (paper 000, section 6): optimizer moments,
scheduler, trainer state with the learning-rate history, and RNG state. This module inspects files without
executing any pickle: safetensors are parsed by header, pickles are checked for the globals they would need.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.errors import CkptAuditError

LEVEL2_ARTIFACTS = ("optimizer", "scheduler", "trainer_state", "rng_state")

# Globals a checkpoint file may need beyond torch's weights-only defaults and still count as safe:
# the numpy pieces the Trainer itself allow-lists for rng_state.pth.
SAFE_EXTRA_GLOBALS = {
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Int64DType",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "_codecs.encode",
    "builtins.set",
    "collections.OrderedDict",
}

TEXT_SUFFIXES = {".json", ".txt", ".md", ".model", ".yaml", ".yml", ".jinja", ".py", ".tiktoken", ".merges", ".csv", ".log"}


@dataclass(frozen=True)
class FileSafety:
    """One file of a checkpoint and whether it can be loaded without running code."""

    path: str
    kind: str  # safetensors | pickle | gguf | text | dcp-metadata | other
    safe: bool
    detail: str = ""

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "safe": self.safe, "detail": self.detail}


@dataclass(frozen=True)
class CheckpointInfo:
    """What one checkpoint holds."""

    step: int
    path: str
    layout: str
    n_params: int
    bytes: int
    dtypes: dict[str, int]  # dtype -> number of scalars
    params_by_role: dict[str, int]
    params_by_block: dict[str, int]
    artifacts: dict[str, bool]  # optimizer, scheduler, trainer_state, lr_history, rng_state
    files: tuple[FileSafety, ...]

    @property
    def has_optimizer_state(self) -> bool:
        return self.artifacts.get("optimizer", False)

    @property
    def missing(self) -> list[str]:
        return [a for a in LEVEL2_ARTIFACTS if not self.artifacts.get(a, False)]

    def to_json(self) -> dict:
        return {
            "step": self.step,
            "path": self.path,
            "layout": self.layout,
            "n_params": self.n_params,
            "bytes": self.bytes,
            "dtypes": self.dtypes,
            "params_by_role": self.params_by_role,
            "params_by_block": self.params_by_block,
            "has_optimizer_state": self.has_optimizer_state,
            "artifacts": self.artifacts,
            "missing": self.missing,
            "files": [f.to_json() for f in self.files],
        }


@dataclass(frozen=True)
class InspectResult:
    """Provenance of a whole run."""

    run: str
    architecture: str
    architecture_note: str
    checkpoints: tuple[CheckpointInfo, ...]
    lr_history_points: int
    extra: dict[str, Any] = field(default_factory=dict)
    # The run's hyper-parameters at its last checkpoint (io.hyperparams): name -> {"value", "source"}.
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    hyperparameter_notes: tuple[str, ...] = ()

    @property
    def missing(self) -> list[str]:
        """Level-2 artifacts absent from at least one checkpoint."""
        out: list[str] = []
        for c in self.checkpoints:
            for m in c.missing:
                if m not in out:
                    out.append(m)
        return out

    @property
    def provenance_complete(self) -> bool:
        return not self.missing

    @property
    def all_files_safe(self) -> bool:
        return all(f.safe for c in self.checkpoints for f in c.files)

    def to_json(self) -> dict:
        return {
            "run": self.run,
            "architecture": self.architecture,
            "architecture_note": self.architecture_note,
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "provenance_complete": self.provenance_complete,
            "missing": self.missing,
            "all_files_safe": self.all_files_safe,
            "unsafe_files": [f.path for c in self.checkpoints for f in c.files if not f.safe],
            "lr_history_points": self.lr_history_points,
            "hyperparameters": self.hyperparameters,
            "hyperparameters_step": self.checkpoints[-1].step if self.checkpoints else None,
            "hyperparameter_notes": list(self.hyperparameter_notes),
        }

    def to_hdf5_tree(self) -> dict:
        cks = self.checkpoints
        return {
            "hyperparameters_json": json.dumps(self.hyperparameters, sort_keys=True),
            "run": self.run,
            "architecture": self.architecture,
            "provenance_complete": self.provenance_complete,
            "all_files_safe": self.all_files_safe,
            "missing": json.dumps(self.missing),
            "steps": [c.step for c in cks],
            "n_params": [c.n_params for c in cks],
            "bytes": [c.bytes for c in cks],
            "has_optimizer_state": [c.has_optimizer_state for c in cks],
            "checkpoints": [
                {
                    "step": c.step,
                    "path": c.path,
                    "layout": c.layout,
                    "artifacts": {k: bool(v) for k, v in c.artifacts.items()},
                    "params_by_role": {k: int(v) for k, v in c.params_by_role.items()},
                    "params_by_block": {k: int(v) for k, v in c.params_by_block.items()},
                    "dtypes": {k: int(v) for k, v in c.dtypes.items()},
                    "files": [f.path for f in c.files],
                    "files_safe": [f.safe for f in c.files],
                    "files_kind": [f.kind for f in c.files],
                }
                for c in cks
            ],
        }


def file_safety(path: Path) -> FileSafety:
    """Classify one file by its content and decide whether loading it can run code. Never unpickles."""
    import torch

    from ckptaudit.io.tensors import detect_format

    p = Path(path)
    if p.is_dir():
        return FileSafety(str(p), "other", True, "directory")
    if p.name == ".metadata":
        # torch reads it with plain pickle; ckptaudit parses it with a restricted unpickler instead.
        return FileSafety(str(p), "dcp-metadata", True, "pickle; read by ckptaudit with a restricted unpickler")
    try:
        kind = detect_format(p)
    except CkptAuditError:
        kind = "unknown"
    if kind in ("safetensors", "safetensors-index"):
        return FileSafety(str(p), "safetensors", True)
    if kind == "gguf":
        return FileSafety(str(p), "gguf", True)
    if kind == "torch-zip" and p.name == "training_args.bin":
        # The Trainer pickles its TrainingArguments object here: loading it would run arbitrary code.
        return FileSafety(str(p), "pickle", False, "pickled TrainingArguments object; ckptaudit never loads it")
    if kind == "torch-zip":
        try:
            needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
        except Exception as e:  # a damaged zip: not loadable, so not safe to ship
            return FileSafety(str(p), "pickle", False, f"unreadable pickle archive: {e}")
        bad = sorted(needed - SAFE_EXTRA_GLOBALS)
        if bad:
            return FileSafety(str(p), "pickle", False, "needs non-weights-only globals: " + ", ".join(bad[:5]))
        if needed:  # safe, but a plain torch.load(weights_only=True) refuses it without the allow-list
            return FileSafety(str(p), "pickle", True,
                              "weights-only loadable with allow-listed numpy/builtin globals "
                              f"(torch.serialization.safe_globals: {', '.join(sorted(needed)[:4])})")
        return FileSafety(str(p), "pickle", True, "weights-only loadable")
    if kind == "torch-legacy":
        return _legacy_pickle_safety(p)
    if p.suffix.lower() in TEXT_SUFFIXES or _looks_text(p):
        return FileSafety(str(p), "text", True)
    return FileSafety(str(p), "other", True, "not a serialized object")


def _looks_text(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if not head:
        return True
    if head[:1] in (b"\x80",) or zipfile.is_zipfile(p):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _legacy_pickle_safety(p: Path) -> FileSafety:
    """Legacy (non-zip) torch pickles: try a weights-only load; the restricted unpickler never runs code."""
    from ckptaudit.errors import UnsafePickleError
    from ckptaudit.io.tensors import safe_torch_load

    try:
        safe_torch_load(p)
    except UnsafePickleError as e:
        return FileSafety(str(p), "pickle", False, e.message)
    except CkptAuditError as e:
        return FileSafety(str(p), "pickle", False, e.message)
    return FileSafety(str(p), "pickle", True, "weights-only loadable")


def checkpoint_files(ckpt: Any) -> list[Path]:
    """Every file that belongs to a checkpoint: the whole folder for directory layouts, else the file."""
    p = Path(ckpt.path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return [p]


def inspect_checkpoint(ckpt: Any, role_map: Any = None, check_files: bool = True) -> tuple[CheckpointInfo, str, str]:
    """Inspect one checkpoint: parameter counts by role/block/dtype from tensor headers only.

    Returns (info, architecture name, note). An architecture ckptaudit cannot place is reported, not raised:
    inspect must work on any checkpoint.
    """
    from ckptaudit.errors import UnknownArchitectureError
    from ckptaudit.io.roles import resolve_architecture

    with ckpt.tensors() as src:
        names = list(src.keys())
        shapes = {n: tuple(src.shape(n)) for n in names}
        dtypes: Counter[str] = Counter()
        n_params = 0
        for n in names:
            numel = 1
            for s in shapes[n]:
                numel *= int(s)
            n_params += numel
            dtypes[str(src.dtype(n)).replace("torch.", "")] += numel
    by_role: Counter[str] = Counter()
    by_block: Counter[str] = Counter()
    arch_name, note = "unknown", ""
    try:
        arch = resolve_architecture(shapes, ckpt.config(), role_map=role_map)
        arch_name = arch.name
        for piece in arch.pieces:
            by_role[piece.role] += piece.numel
            by_block["none" if piece.block is None else str(piece.block)] += piece.numel
    except UnknownArchitectureError as e:
        note = e.message
    from ckptaudit.io.optimizer import lr_history

    artifacts = {
        "optimizer": ckpt.optimizer_file is not None,
        "scheduler": ckpt.scheduler_file is not None,
        "trainer_state": ckpt.trainer_state_file is not None,
        "lr_history": bool(lr_history(ckpt)),
        "rng_state": bool(ckpt.rng_files),
    }
    if ckpt.layout == "lightning":
        artifacts.update(_lightning_artifacts(Path(ckpt.path)))
    files = tuple(file_safety(f) for f in checkpoint_files(ckpt)) if check_files else ()
    total_bytes = sum(Path(f).stat().st_size for f in ckpt.weight_files)
    info = CheckpointInfo(
        step=int(ckpt.step),
        path=str(ckpt.path),
        layout=ckpt.layout,
        n_params=n_params,
        bytes=int(total_bytes),
        dtypes=dict(dtypes),
        params_by_role=dict(sorted(by_role.items())),
        params_by_block=dict(sorted(by_block.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0].isdigit() else 0))),
        artifacts=artifacts,
        files=files,
    )
    return info, arch_name, note


def _lightning_artifacts(path: Path) -> dict[str, bool]:
    """A Lightning .ckpt carries optimizer and scheduler state inside the one file."""
    from ckptaudit.io.tensors import safe_torch_load

    try:
        obj = safe_torch_load(path)
    except CkptAuditError:
        return {}
    if not isinstance(obj, dict):
        return {}
    return {
        "optimizer": bool(obj.get("optimizer_states")),
        "scheduler": bool(obj.get("lr_schedulers")),
        "trainer_state": "global_step" in obj,
        "rng_state": False,
    }


def inspect_run(run: Any, role_map: Any = None, check_files: bool = True, progress: Any = None) -> InspectResult:
    """Inspect every checkpoint of a run (headers and file kinds only; no tensor data is read)."""
    infos = []
    arch_name, note = "unknown", ""
    for ckpt in run.checkpoints:
        info, arch_name, note = inspect_checkpoint(ckpt, role_map=role_map, check_files=check_files)
        infos.append(info)
        if progress is not None:
            progress(1)
    from ckptaudit.io.hyperparams import run_hyperparameters
    from ckptaudit.io.optimizer import lr_history

    hp = run_hyperparameters(run.checkpoints[-1])
    return InspectResult(
        run=str(run.path), architecture=arch_name, architecture_note=note, checkpoints=tuple(infos),
        lr_history_points=len(lr_history(run.checkpoints[-1])), hyperparameters=hp.to_json(),
        hyperparameter_notes=hp.notes,
    )
