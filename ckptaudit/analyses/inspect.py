"""Provenance of a run: what each checkpoint holds beyond its weights, and whether its files are safe to load.

A checkpoint is a complete artifact only with its Level-2 state (paper 000, section 6): optimizer moments,
scheduler, trainer state with the learning-rate history, and RNG state. This module inspects files without
executing any pickle; what each file is and whether it is safe to load comes from ``ckptaudit.io.safety``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.errors import CkptAuditError
from ckptaudit.io.safety import FileSafety, file_safety
from ckptaudit.io.types import RunLike, StoredCheckpoint
from ckptaudit.report.tree import TreeResult

__all__ = ["FileSafety", "file_safety", "inspect_checkpoint", "inspect_run", "CheckpointInfo", "InspectResult"]

LEVEL2_ARTIFACTS = ("optimizer", "scheduler", "trainer_state", "rng_state")


@dataclass(frozen=True)
class CheckpointInfo(TreeResult):
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
    shared: dict[str, str] = field(default_factory=dict)  # name stored again -> the name it shares storage with

    @property
    def has_optimizer_state(self) -> bool:
        return self.artifacts.get("optimizer", False)

    @property
    def missing(self) -> list[str]:
        return [a for a in LEVEL2_ARTIFACTS if not self.artifacts.get(a, False)]

    JSON_ONLY = frozenset({"n_params", "bytes", "has_optimizer_state", "missing", "shared_tensors"})  # columns
    HDF5_LAYOUT = {"files": "_file_columns"}  # the report holds the files as columns

    def to_tree(self) -> dict:
        """Keys (--json; the report's /inspect/checkpoints/N holds step, path, layout, artifacts, params_by_role,
        params_by_block, dtypes and the files as columns files, files_safe, files_kind, files_verdict): step, path,
        layout, n_params, bytes, dtypes, params_by_role, params_by_block, has_optimizer_state, artifacts, missing,
        files (one FileSafety document each), shared_tensors."""
        return {
            "step": self.step,
            "path": self.path,
            "layout": self.layout,
            "n_params": self.n_params,
            "bytes": self.bytes,
            "dtypes": {k: int(v) for k, v in self.dtypes.items()},
            "params_by_role": {k: int(v) for k, v in self.params_by_role.items()},
            "params_by_block": {k: int(v) for k, v in self.params_by_block.items()},
            "has_optimizer_state": self.has_optimizer_state,
            "artifacts": {k: bool(v) for k, v in self.artifacts.items()},
            "missing": self.missing,
            "files": [f.to_json() for f in self.files],
            "shared_tensors": dict(self.shared),
        }

    @staticmethod
    def _file_columns(files: list[dict]) -> dict:
        return {"files": [f["path"] for f in files], "files_safe": [f["safe"] for f in files],
                "files_kind": [f["kind"] for f in files], "files_verdict": [f["verdict"] for f in files]}


@dataclass(frozen=True)
class InspectResult(TreeResult):
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
    architecture_recognised_by: str = ""  # which config.json value (or the tensor names) chose the family

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

    JSON_ONLY = frozenset({"architecture_note", "unsafe_files", "unreadable_files", "lr_history_points",
                           "hyperparameters_step", "hyperparameter_notes"})
    HDF5_ONLY = frozenset({"steps", "n_params", "bytes", "has_optimizer_state"})  # per-checkpoint columns
    HDF5_AS_TEXT = {"hyperparameters": "hyperparameters_json", "missing": "missing"}

    def to_tree(self) -> dict:
        """Keys (--json and /inspect): run, architecture, architecture_note, architecture_recognised_by,
        checkpoints (one CheckpointInfo each), provenance_complete, missing (JSON text in the report),
        all_files_safe, unsafe_files, unreadable_files, lr_history_points, hyperparameters (the report's
        hyperparameters_json), hyperparameters_step, hyperparameter_notes; the report adds the per-checkpoint
        columns steps, n_params, bytes, has_optimizer_state."""
        cks = self.checkpoints
        return {
            "run": self.run,
            "architecture": self.architecture,
            "architecture_note": self.architecture_note,
            "architecture_recognised_by": self.architecture_recognised_by,
            "checkpoints": list(cks),
            "provenance_complete": self.provenance_complete,
            "missing": self.missing,
            "all_files_safe": self.all_files_safe,
            "unsafe_files": [f.path for c in cks for f in c.files if not f.safe],
            "unreadable_files": [f.path for c in cks for f in c.files if not f.loadable],
            "lr_history_points": self.lr_history_points,
            "hyperparameters": self.hyperparameters,
            "hyperparameters_step": cks[-1].step if cks else None,
            "hyperparameter_notes": list(self.hyperparameter_notes),
            "steps": [c.step for c in cks],
            "n_params": [c.n_params for c in cks],
            "bytes": [c.bytes for c in cks],
            "has_optimizer_state": [c.has_optimizer_state for c in cks],
        }


def checkpoint_files(ckpt: StoredCheckpoint) -> list[Path]:
    """Every file that belongs to a checkpoint: the whole folder for directory layouts, else the file."""
    p = Path(ckpt.path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return [p]


def inspect_checkpoint(ckpt: StoredCheckpoint, role_map: Any = None, check_files: bool = True) -> tuple[CheckpointInfo, str, str]:
    """Inspect one checkpoint: parameter counts by role/block/dtype from tensor headers only.

    Returns (info, architecture name, note). The note says how the family was recognised, or why no family
    could place the tensors: an architecture ckptaudit cannot place is reported, not raised (inspect must work
    on any checkpoint).
    """
    from ckptaudit.errors import UnknownArchitectureError
    from ckptaudit.io.roles import resolve_architecture

    with ckpt.tensors() as src:
        names = list(src.keys())
        aliases = getattr(src, "aliases", None)
        shared = aliases() if callable(aliases) else {}  # counted once: keys() lists a shared storage once
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
        arch_name, note = arch.name, arch.recognised_by
        for piece in arch.pieces:
            by_role[piece.role] += piece.numel
            by_block["none" if piece.block is None else str(piece.block)] += piece.numel
    except UnknownArchitectureError as e:
        note = e.message
    from ckptaudit.io.optimizer import lr_history

    files = tuple(file_safety(f) for f in checkpoint_files(ckpt)) if check_files else ()
    verdicts = {Path(f.path): f for f in files}

    def present(*paths: Any) -> bool:
        """An artifact counts only when every file of it is there and well-formed (a 0-byte optimizer.pt is not)."""
        found = [Path(x) for x in paths if x is not None]
        return bool(found) and all(x.is_dir() or (verdicts.get(x) or file_safety(x)).loadable for x in found)

    artifacts = {
        "optimizer": present(ckpt.optimizer_file),
        "scheduler": present(ckpt.scheduler_file),
        "trainer_state": ckpt.trainer_state_file is not None,  # parsed (and validated) at discovery
        "lr_history": bool(lr_history(ckpt)),
        "rng_state": present(*ckpt.rng_files),
    }
    if ckpt.layout == "lightning":
        artifacts.update(_lightning_artifacts(Path(ckpt.path)))
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
        shared=shared,
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


def inspect_run(run: RunLike[StoredCheckpoint], role_map: Any = None, check_files: bool = True, progress: Any = None) -> InspectResult:
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
    known = arch_name != "unknown"
    return InspectResult(
        run=str(run.path), architecture=arch_name, architecture_note="" if known else note,
        checkpoints=tuple(infos), lr_history_points=len(lr_history(run.checkpoints[-1])),
        architecture_recognised_by=note if known else "", hyperparameters=hp.to_json(),
        hyperparameter_notes=hp.notes,
    )
