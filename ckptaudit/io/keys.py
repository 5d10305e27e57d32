"""Tensor names: stored names -> the model's names, and TensorSource views under other names.

Training stacks store the same weights under other names than the module that loads them: GPT-NeoX/Pythia files
say ``embed_out.weight`` where transformers 5's module says ``lm_head.weight``; Lightning prefixes the
LightningModule attribute (``model.transformer...``); torch.compile adds ``_orig_mod.``; a base-model checkpoint
lacks the task model's ``transformer.`` prefix. ``model_key_renamer`` maps stored names the way transformers
itself maps them when it loads a checkpoint (its conversion mapping in 5.x, ``_checkpoint_conversion_mapping``
and ``_fix_state_dict_key_on_load`` in 4.x), so no rule is kept here by hand. ``MappedSource`` exposes a
TensorSource under new names (optionally transforming each tensor on read, e.g. transposing), and
``prefix_matching`` finds the module prefix of a prefixed state dict by matching it against a model's names.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ckptaudit.errors import LayoutError
from ckptaudit.io.source import TensorSource

__all__ = ["MappedSource", "model_key_renamer", "prefix_matching", "strip_prefix"]

Transform = Callable[[torch.Tensor], torch.Tensor]


def model_key_renamer(model: torch.nn.Module) -> Callable[[str], str]:
    """A function stored name -> ``model``'s state-dict name, as transformers renames keys when loading.

    transformers 5: the model's conversion mapping (``get_model_conversion_mapping``), renamings only, plus the
    base-model prefix added or removed where the model has the result. A key that needs one of transformers'
    tensor *conversions* (several stored tensors merged into one, e.g. MoE experts) raises LayoutError: it
    cannot be filled one tensor at a time. transformers 4.x: the class's ``_checkpoint_conversion_mapping``
    regexes and ``_fix_state_dict_key_on_load``. Non-transformers modules: the identity.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return lambda key: key
    if not isinstance(model, PreTrainedModel):
        return lambda key: key
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return _renamer_4x(model)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        new, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if pattern is not None:
            raise LayoutError(
                f"tensor {key!r} is one part of a tensor transformers assembles from several stored tensors "
                f"({pattern}); ckptaudit fills models one stored tensor at a time",
                hint="load and re-save the model with transformers (save_pretrained) to store its own layout",
            )
        return new

    return rename


def _renamer_4x(model: torch.nn.Module) -> Callable[[str], str]:
    mapping = dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})
    fix = getattr(model, "_fix_state_dict_key_on_load", None)
    names = set(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "") or ""

    def rename(key: str) -> str:
        for pattern, replacement in mapping.items():
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        if callable(fix):
            key = fix(key)[0]
        if prefix and key not in names:
            if key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
                key = key[len(prefix) + 1:]
            elif f"{prefix}.{key}" in names:
                key = f"{prefix}.{key}"
        return key

    return rename


def prefix_matching(stored: Iterable[str], model_names: Iterable[str]) -> str | None:
    """The prefix P (ending in "." or empty) such that stored names ``P + name`` are the model's names.

    Found by matching, never guessed: every stored name that ends in ".<model name>" proposes its head as P;
    the P that covers the most model names wins, and only when it covers at least half of them (ties between
    prefixes -> None). "" when the stored names are already the model's.
    """
    stored = list(stored)
    model = set(model_names)
    if not model:
        return None
    votes: Counter[str] = Counter()
    for key in stored:
        if key in model:
            votes[""] += 1
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in model:
                votes[".".join(parts[:i]) + "."] += 1
    if not votes:
        return None
    top = votes.most_common(2)
    best, n = top[0]
    if len(top) > 1 and top[1][1] == n:
        return None
    return best if n * 2 >= len(model) else None


def strip_prefix(source: TensorSource, prefix: str, keep_others: bool = False) -> MappedSource:
    """``source`` with ``prefix`` removed from the names that carry it; names without it are dropped (or kept
    as they are with ``keep_others``)."""
    names = {}
    for key in source.keys():
        if key.startswith(prefix):
            names[key[len(prefix):]] = key
        elif keep_others:
            names.setdefault(key, key)
    return MappedSource(source, names)


class MappedSource(TensorSource):
    """A TensorSource under other names: ``names`` maps each exposed name to the underlying source's name.

    ``transforms`` (exposed name -> function) changes a tensor on read, with ``shapes`` giving the shape it then
    has (e.g. a transposed Linear weight); everything else is passed through. Closing closes the underlying
    source. ``aliases()`` of the underlying source are carried over under the exposed names. ``extra`` adds
    tensors that the underlying source lacks (e.g. zero biases for a model that has none), listed after its own.
    """

    def __init__(self, source: TensorSource, names: Mapping[str, str],
                 transforms: Mapping[str, Transform] | None = None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None,
                 extra: Mapping[str, torch.Tensor] | None = None):
        super().__init__(Path(source.path), source.format)
        self._src = source
        self._names = dict(names)
        self._transforms = dict(transforms or {})
        self._shapes = dict(shapes or {})
        self._extra = {k: v for k, v in (extra or {}).items() if k not in self._names}
        self.ranged_reads = bool(source.ranged_reads) and not self._transforms and not self._extra

    def _inner(self, name: str) -> str:
        try:
            return self._names[name]
        except KeyError:
            raise self._missing(name) from None

    def keys(self) -> list[str]:
        return list(self._names) + list(self._extra)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._extra:
            return tuple(self._extra[name].shape)
        if name in self._shapes:
            return tuple(self._shapes[name])
        return self._src.shape(self._inner(name))

    def dtype(self, name: str) -> torch.dtype:
        if name in self._extra:
            return self._extra[name].dtype
        return self._src.dtype(self._inner(name))

    def get(self, name: str) -> torch.Tensor:
        if name in self._extra:
            return self._extra[name]
        tensor = self._src.get(self._inner(name))
        fn = self._transforms.get(name)
        return fn(tensor) if fn is not None else tensor

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if name in self._transforms or name in self._extra:
            return TensorSource.read_flat(self, name, start, stop, out)
        return self._src.read_flat(self._inner(name), start, stop, out)

    def remap(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """A stream of (underlying name, tensor) pairs as this view exposes them: renamed, transformed, names
        the view leaves out skipped, and ``extra`` tensors appended at the end."""
        exposed = {inner: name for name, inner in self._names.items()}
        for inner, tensor in pairs:
            name = exposed.get(inner)
            if name is None:
                continue
            fn = self._transforms.get(name)
            yield name, fn(tensor) if fn is not None else tensor
        yield from self._extra.items()

    def aliases(self) -> dict[str, str]:
        back = {v: k for k, v in self._names.items()}
        inner = getattr(self._src, "aliases", None)
        found = inner() if callable(inner) else {}
        out = {}
        for key, kept in found.items():
            name = back.get(kept, kept)
            head = kept[: len(kept) - len(name)] if kept.endswith(name) else ""
            out[back.get(key, key[len(head):] if head and key.startswith(head) else key)] = name
        return out

    def files(self) -> list[Path]:
        return self._src.files()

    def close(self) -> None:
        self._flat_cache = None
        self._src.close()
