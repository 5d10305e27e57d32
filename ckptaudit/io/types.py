"""What analyses and the gate may ask of a checkpoint and of a run: typing Protocols, satisfied by the
:class:`ckptaudit.io.discover.Checkpoint` and :class:`ckptaudit.io.discover.Run` that discovery returns (and by the
small stand-ins tests build from files they wrote).

- :class:`CheckpointLike`: a step and its weights, config and trainer state: what the analyses of the weights read.
- :class:`StoredCheckpoint`: the files discovery found beside the weights (optimizer, scheduler, RNG state), its
  layout, and the tensors under a live model's names: what the analyses that resume or run the model read.
- :class:`RunLike`: the checkpoints of one run in step order.

The Protocols are ``runtime_checkable``: ``isinstance(x, StoredCheckpoint)`` checks that every member exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ckptaudit.io.source import TensorSource


@runtime_checkable
class CheckpointLike(Protocol):
    """One checkpoint of a run, as the analyses of its weights read it."""

    @property
    def step(self) -> int:
        """Training step (optimizer steps)."""
        ...

    @property
    def path(self) -> Path:
        """The checkpoint folder, or the file for single-file layouts."""
        ...

    def tensors(self) -> TensorSource:
        """The stored tensors, opened lazily (a context manager)."""
        ...

    def config(self) -> dict | None:
        """The model config (config.json, or what the stack records), or None."""
        ...

    def trainer_state(self) -> dict | None:
        """The parsed trainer_state.json, or None."""
        ...


@runtime_checkable
class StoredCheckpoint(CheckpointLike, Protocol):
    """A checkpoint with the files discovery found for it (``None`` / empty where a file is absent)."""

    @property
    def layout(self) -> str:
        """The training stack's layout ("hf-trainer", "lightning", ...; io.discover.LAYOUTS)."""
        ...

    @property
    def directory(self) -> Path:
        """The folder holding the checkpoint's files."""
        ...

    @property
    def weight_files(self) -> tuple[Path, ...]: ...

    @property
    def optimizer_file(self) -> Path | None: ...

    @property
    def scheduler_file(self) -> Path | None: ...

    @property
    def trainer_state_file(self) -> Path | None: ...

    @property
    def rng_files(self) -> tuple[Path, ...]: ...

    @property
    def config_file(self) -> Path | None: ...

    def model_tensors(self, model: torch.nn.Module) -> TensorSource:
        """The tensors under ``model``'s names and layout (a stack's own names mapped)."""
        ...

    def model_stream(self, model: torch.nn.Module, pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterable[Any]:
        """(stored name, tensor) pairs of this layout mapped as ``model_tensors`` maps the stored tensors."""
        ...


C_co = TypeVar("C_co", bound=CheckpointLike, covariant=True)


@runtime_checkable
class RunLike(Protocol[C_co]):
    """The checkpoints of one training run, sorted by step (steps unique)."""

    @property
    def path(self) -> Path: ...

    @property
    def checkpoints(self) -> Sequence[C_co]: ...

    @property
    def steps(self) -> list[int]:
        """The training steps, ascending."""
        ...


def checkpoint_path(ckpt: CheckpointLike | str | Path) -> Path:
    """The path of ``ckpt``: a checkpoint's ``path``, or the path itself (the stack readers take either)."""
    return Path(ckpt) if isinstance(ckpt, (str, Path)) else Path(ckpt.path)
