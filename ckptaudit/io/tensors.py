"""Lazy tensors of one checkpoint, whatever its format, behind one interface (``TensorSource``).

Formats are recognised by their first bytes, never by file extension. Every reader answers ``keys()``,
``shape()`` and ``dtype()`` from headers alone and reads one tensor's bytes per ``get()``:

- safetensors: the header is parsed once; tensor bytes are read with positioned reads (``os.preadv``) into
  freshly allocated buffers, never memory-mapped, so the resident memory of a process that reads many
  checkpoints stays flat; sharded checkpoints through their ``*.index.json`` weight map, each shard opened on
  first use;
- torch pickles (zip or legacy): ``torch.load(weights_only=True)``, memory-mapped when the file is a zip, with
  the state dict found under "state_dict" / "model_state_dict" / "model" / "module";
- GGUF: ``gguf.GGUFReader`` (memory-mapped); quantised tensors are dequantised to float32 on ``get``;
- torch.distributed.checkpoint folders: see ``ckptaudit.io.dcp`` (restricted metadata unpickler).

Besides whole tensors, every source answers ranged reads: ``read_flat(name, start, stop)`` returns elements
[start, stop) of the row-major flattened tensor in its stored dtype. Safetensors (single and sharded) read only
those bytes (``ranged_reads = True``); the other formats fetch the tensor once and slice it, keeping that one
tensor until another is asked for.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptaudit.errors import InputNotFoundError, LayoutError
from ckptaudit.io.detect import detect_format
from ckptaudit.io.safetensors_source import SafetensorsSource, ShardedSource, read_index
from ckptaudit.io.source import FORMATS, STATE_DICT_KEYS, TensorNotFoundError, TensorSource
from ckptaudit.io.torchload import safe_torch_load

__all__ = [
    "FORMATS",
    "STATE_DICT_KEYS",
    "SafetensorsSource",
    "ShardedSource",
    "TensorNotFoundError",
    "TensorSource",
    "WEIGHT_DIR_NAMES",
    "WEIGHT_FILE_NAMES",
    "WEIGHT_INDEX_NAMES",
    "detect_format",
    "find_weights",
    "is_training_state_file",
    "open_tensors",
    "read_index",
    "safe_torch_load",
]

# ------------------------------------------------------------------------------------------ opening


# Weight files of a checkpoint directory, in order of preference. Accelerate's save_state writes
# model.safetensors for its first model (model_0.safetensors in some versions), pytorch_model.bin without
# safetensors; HF Trainer with FSDP writes a DCP folder pytorch_model_fsdp_0/.
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILE_NAMES = ("model.safetensors", "model_0.safetensors", "pytorch_model.bin", "model.bin",
                     "pytorch_model_0.bin")
WEIGHT_DIR_NAMES = ("pytorch_model_fsdp_0",)
_LOOSE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf")


def find_weights(directory: Path | str) -> tuple[Path, tuple[Path, ...]] | None:
    """Where the model weights of a checkpoint directory live, or None when it has none.

    Returns (entry, files): ``entry`` is what ``open_tensors`` opens (a file, an index JSON or a DCP folder) and
    ``files`` the weight files behind it. Looks, in order, for: a DCP ``.metadata``; a sharded index; the
    standard single-file names (WEIGHT_FILE_NAMES); an FSDP DCP sub-folder; else exactly one *.safetensors /
    *.pt / *.pth / *.bin / *.ckpt / *.gguf file whose content is a checkpoint. Several candidates with no
    standard name -> LayoutError naming them.
    """
    d = Path(directory)
    if (d / ".metadata").is_file():
        return d, tuple(sorted(d.glob("*.distcp")))
    for name in WEIGHT_INDEX_NAMES:
        idx = d / name
        if idx.is_file():
            return idx, tuple(dict.fromkeys(read_index(idx).values()))
    for name in WEIGHT_FILE_NAMES:
        if (d / name).is_file():
            return d / name, (d / name,)
    for name in WEIGHT_DIR_NAMES:
        if (d / name / ".metadata").is_file():
            return d / name, tuple(sorted((d / name).glob("*.distcp")))
    candidates = []
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix.lower() in _LOOSE_SUFFIXES and not is_training_state_file(f.name):
            try:
                if detect_format(f) in ("safetensors", "torch-zip", "torch-legacy", "gguf"):
                    candidates.append(f)
            except LayoutError:
                continue
    if len(candidates) == 1:
        return candidates[0], (candidates[0],)
    if len(candidates) > 1:
        raise LayoutError(
            f"{d}: several weight files and none with a standard name: {', '.join(c.name for c in candidates)}",
            hint="pass the one you mean as a file",
        )
    return None


_TRAINING_STATE_RE = re.compile(
    r"^(optimizer(_\d+)?\.(pt|bin)|scheduler(_\d+)?\.(pt|bin)|sampler(_\d+)?\.bin|scaler\.pt|training_args\.bin"
    r"|rng_state(_\d+)?\.pth|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl)$"
)


def is_training_state_file(name: str) -> bool:
    """Optimizer/scheduler/RNG/args files that sit next to the weights in Trainer and Accelerate folders."""
    return bool(_TRAINING_STATE_RE.match(name))


def open_tensors(path: Path | str) -> TensorSource:
    """Open the tensors of one checkpoint: a weight file (any of FORMATS), an index JSON, or a checkpoint
    directory (Trainer / Accelerate / model folder / DCP folder; see ``find_weights``).

    Only headers are read here. Missing path -> InputNotFoundError; corrupt file -> CorruptFileError; a
    directory without weights -> LayoutError naming what it holds.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory", hint="check the path")
    if p.is_dir():
        found = find_weights(p)
        if found is None:
            seen = sorted(c.name for c in p.iterdir())[:12]
            raise LayoutError(
                f"{p}: no model weights found (contents: {', '.join(seen) or 'empty'})",
                hint="expected model.safetensors, a sharded index, pytorch_model.bin, *.pt, *.gguf or a DCP folder",
            )
        p = found[0]
        if p.is_dir():
            from ckptaudit.io.dcp import DCPSource

            return DCPSource(p)
    return _open_file(p)


def _open_file(p: Path) -> TensorSource:
    fmt = detect_format(p)
    if fmt == "safetensors":
        return SafetensorsSource(p)
    if fmt == "safetensors-index":
        return ShardedSource(p)
    if fmt in ("torch-zip", "torch-legacy"):
        from ckptaudit.io.formats import PickleSource

        return PickleSource(p, fmt)
    if fmt == "gguf":
        from ckptaudit.io.formats import GGUFSource

        return GGUFSource(p)
    from ckptaudit.io.dcp import DCPSource

    return DCPSource(p)
