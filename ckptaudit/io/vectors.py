"""Backbone-vector files written by ``ckptaudit backbone --save-vectors``: the one reader.

Layout (``analyses/backbone.save_backbone_vectors``): one entry per stored tensor, key = tensor name, value
``[k, *tensor_shape]`` with entry j = V_{j+1} on that tensor (zero outside the trunk pieces; V_1 is the backbone
direction v_b); an entry of shape ``[*tensor_shape]`` (hand-made files) counts as k = 1. Optional entries
``switch/<tensor name>`` of shape ``tensor_shape`` hold a switching direction. Metadata (str -> str): k,
anchor_step, steps, sigma, group, normalize_rows, layout.

:func:`read_vectors` opens the file once through :class:`ckptaudit.io.safetensors_source.SafetensorsSource` (positioned
reads, nothing memory-mapped) and reads only the tensors the caller names, and of each only its first ``rows``
rows, so memory is what the caller keeps, not the size of the file. Every problem is a
:class:`~ckptaudit.errors.CkptAuditError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptaudit.errors import CorruptFileError, InputNotFoundError, LayoutError
from ckptaudit.io.safetensors_source import SafetensorsSource

__all__ = ["BLOCK_PREFIX", "SWITCH_PREFIX", "VectorFile", "read_vectors"]

SWITCH_PREFIX = "switch/"
BLOCK_PREFIX = "block/"  # block/<tensor>: the backbone of the tensor's own block (its PC1)
WRITE_HINT = "write one with `ckptaudit backbone --save-vectors`"
REWRITE_HINT = "the vectors file is damaged or incomplete: write it again with `ckptaudit backbone --save-vectors`"
SIZE_HINT = "the vectors were computed on another model size"
ARCH_HINT = "the vectors were computed on another architecture"


@dataclass(frozen=True, eq=False)
class VectorFile:
    """What :func:`read_vectors` read. ``stacks``: tensor name -> float64 ``[k, *tensor_shape]`` (row j = V_{j+1},
    as stored, not renormalised); every stack has the same ``k``. ``switch``: tensor name -> float64
    ``[*tensor_shape]`` (empty when the file has no switching direction or it was not asked for). ``metadata``:
    the file's safetensors metadata. ``block``: tensor name -> float64 ``[*tensor_shape]``, the backbone of that
    tensor's own block (files written since block backbones were added; empty otherwise or when not asked for)."""

    path: Path
    stacks: dict[str, torch.Tensor]
    switch: dict[str, torch.Tensor]
    metadata: dict[str, str]
    block: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Rows read per tensor (the file's k, capped by ``rows``)."""
        return int(next(iter(self.stacks.values())).shape[0])

    def row(self, j: int) -> dict[str, torch.Tensor]:
        """V_{j+1} by tensor name (views of the stacks), ``[*tensor_shape]`` each."""
        return {n: t[j] for n, t in self.stacks.items()}

    def backbone(self, unit: bool = False) -> dict[str, torch.Tensor]:
        """v_b = V_1 by tensor name; with ``unit``, divided by its norm over the tensors read."""
        v = self.row(0)
        if not unit:
            return v
        norm = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
        return {n: x / norm for n, x in v.items()}


def _stack_rows(path: Path, name: str, stored: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """k of entry ``name``: ``[k, *shape]`` -> k, ``shape`` itself -> 1; any other shape is an error naming both."""
    if stored == shape:
        return 1
    if len(stored) == len(shape) + 1 and stored[1:] == shape:
        return stored[0]
    raise CorruptFileError(f"{path}: vector tensor {name} has shape {stored}, the model's tensor {shape}",
                           hint=SIZE_HINT)


def _read_rows(src: SafetensorsSource, key: str, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The first ``rows`` rows of entry ``key`` as float64 ``[rows, *shape]`` (only those bytes are read)."""
    numel = math.prod(shape)
    try:
        flat = src.read_flat(key, 0, rows * numel)
    except (CorruptFileError, LayoutError) as exc:  # truncated data, a dtype torch cannot hold
        raise CorruptFileError(exc.message, hint=REWRITE_HINT) from None
    return flat.to(torch.float64).reshape(rows, *shape)


def read_vectors(
    path: str | Path,
    shapes: Mapping[str, Sequence[int]],
    *,
    rows: int | None = None,
    switch: bool = False,
    partial: bool = False,
    block: bool = False,
) -> VectorFile:
    """Read the backbone vectors of the tensors in ``shapes`` (tensor name -> the model's shape of that tensor).

    ``partial`` False: every tensor of ``shapes`` must be in the file (a missing one is an error naming it);
    the file's other entries are not read. ``partial`` True: the file may cover only some of ``shapes`` (the
    others are absent from the result), but every vector entry it holds must be one of them. ``switch/`` entries
    are never vector entries, nor are ``block/`` entries. ``rows``: read at most this many rows (V_1..V_rows) of each
    entry, None = all. ``block``: also read ``block/<name>`` where the file has it (the tensor's block backbone).
    ``switch``: also read ``switch/<name>`` of every tensor read (all or none of them must have one).

    Errors: a missing file -> InputNotFoundError; not safetensors, truncated, or a dtype torch cannot hold ->
    CorruptFileError; an entry whose shape is neither ``[k, *shape]`` nor ``shape``, a missing or unknown
    tensor, no vector entry at all, k = 0, or V_1 zero / not finite on the tensors read -> CorruptFileError.
    """
    path = Path(path)
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such vectors file", hint=WRITE_HINT)
    want = {str(n): tuple(int(x) for x in s) for n, s in shapes.items()}
    try:
        src = SafetensorsSource(path)
    except CorruptFileError as exc:  # bad length, header not JSON, offsets outside the file...
        raise CorruptFileError(exc.message, hint=REWRITE_HINT) from None
    with src:
        keys = set(src.keys())
        if partial:
            unknown = sorted(k for k in keys if not k.startswith((SWITCH_PREFIX, BLOCK_PREFIX)) and k not in want)
            if unknown:
                raise CorruptFileError(f"{path}: vector tensor {unknown[0]} is not a parameter of the model"
                                       + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                                       hint=ARCH_HINT)
            names = [n for n in want if n in keys]
        else:
            missing = [n for n in want if n not in keys]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                hint = ARCH_HINT
                if all(n.endswith(".bias") for n in missing):
                    hint = "the vectors hold weights only: write them with `ckptaudit backbone --include-bias` too"
                raise CorruptFileError(f"{path}: no vector entry for tensor {missing[0]}{more}", hint=hint)
            names = list(want)
        if not names:
            raise CorruptFileError(f"{path}: holds no backbone vector (no entry keyed by a tensor name)",
                                   hint=WRITE_HINT)
        # Check every shape before reading any data, then read only the rows every entry has.
        ks = {n: _stack_rows(path, n, tuple(src.shape(n)), want[n]) for n in names}
        k = min(ks.values()) if rows is None else min(rows, *ks.values())
        if k == 0:
            empty = next(n for n, kn in ks.items() if kn == 0)
            raise CorruptFileError(f"{path}: vector tensor {empty} holds no vectors (k = 0)", hint=REWRITE_HINT)
        sw_names = [n for n in names if SWITCH_PREFIX + n in keys] if switch else []
        if sw_names and len(sw_names) != len(names):
            lacking = next(n for n in names if n not in sw_names)
            raise CorruptFileError(f"{path}: the switching direction covers {len(sw_names)} of the {len(names)} "
                                   f"tensors read (no {SWITCH_PREFIX}{lacking})", hint=REWRITE_HINT)
        for n in sw_names:
            stored = tuple(src.shape(SWITCH_PREFIX + n))
            if stored != want[n] and stored != (1, *want[n]):
                raise CorruptFileError(f"{path}: vector tensor {SWITCH_PREFIX}{n} has shape {stored}, the model's "
                                       f"tensor {want[n]}", hint=SIZE_HINT)
        stacks = {n: _read_rows(src, n, k, want[n]) for n in names}
        sw = {n: _read_rows(src, SWITCH_PREFIX + n, 1, want[n])[0] for n in sw_names}
        own = {}
        for n in (names if block else []):
            if BLOCK_PREFIX + n in keys:
                stored = tuple(src.shape(BLOCK_PREFIX + n))
                if stored != want[n]:
                    raise CorruptFileError(f"{path}: vector tensor {BLOCK_PREFIX}{n} has shape {stored}, the "
                                           f"model's tensor {want[n]}", hint=SIZE_HINT)
                own[n] = _read_rows(src, BLOCK_PREFIX + n, 1, want[n])[0]
        metadata = dict(src.metadata)
    sq = sum(float((t[0] * t[0]).sum()) for t in stacks.values())
    if not math.isfinite(sq) or sq == 0.0:
        what = "zero" if sq == 0.0 else "not finite"
        raise CorruptFileError(f"{path}: the backbone vector V_1 is {what} on the {len(stacks)} tensor(s) read",
                               hint="check that the vectors belong to this model, or write them again with "
                                    "`ckptaudit backbone --save-vectors`")
    return VectorFile(path, stacks, sw, metadata, own)
