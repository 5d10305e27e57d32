"""Read pickled objects of other libraries as plain data, without importing or running any of their code.

Some files that training stacks write are ``torch.save`` archives of objects rather than of tensors: the
Trainer's ``training_args.bin`` (a ``TrainingArguments`` dataclass), DeepSpeed's ``*_optim_states.pt`` (a
``LossScaler`` beside the flat partitions). Loading them the usual way imports the library and lets the pickle
call whatever it names. ``load_plain`` reads them with torch's weights-only unpickler instead, in which every
global outside torch's own allow-list is replaced by a *stand-in*: a class that records the name, the
constructor arguments and the state that the pickle hands it, and does nothing else. No module named by the
file is imported; no function named by it is called.

The globals a file needs are listed beforehand by torch's static scan of the archive
(``torch.serialization.get_unsafe_globals_in_checkpoint``, which reads opcodes and executes nothing); each must
lie under one of the module prefixes the caller allows (``transformers.`` for training arguments, say). A
global outside them (``os.system``, ``builtins.eval``...) refuses the whole file with UnsafePickleError.

The result is converted by ``to_plain``: a stand-in built from a state dict becomes that dict, with the class
name under ``"__class__"``; a stand-in built from one constructor argument and no state (an ``Enum`` member, as
``SchedulerType('cosine')`` pickles) becomes that argument; anything else becomes
``{"__class__", "args", "state"}``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ckptaudit.errors import CorruptFileError, UnsafePickleError

CLASS_KEY = "__class__"


class StandIn:
    """Base of the stand-in classes: what the pickle asked to build, recorded and never acted on."""

    _global: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        inst = object.__new__(cls)
        inst.args = args  # NEWOBJ passes constructor arguments here (and never calls __init__)
        inst.state = None
        return inst

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls the class: arguments already kept
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self._global} args={self.args!r} state={self.state!r}>"


def _stand_in(full_name: str) -> type[StandIn]:
    return type(full_name.rsplit(".", 1)[-1], (StandIn,), {"_global": full_name, "__module__": __name__})


def pickle_globals(path: Path | str) -> list[str]:
    """The globals (``module.name``) a ``torch.save`` zip archive needs beyond torch's weights-only list, found by
    reading its opcodes (nothing is executed). CorruptFileError when the archive cannot be read."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(Path(path)))
    except Exception as exc:  # noqa: BLE001 - an untrusted archive may be broken in any way
        raise CorruptFileError(f"{path}: not a readable torch.save archive ({exc})",
                               hint="the file is damaged or incomplete: re-save it") from None


def load_plain(path: Path | str, allow: Iterable[str], what: str = "object") -> Any:
    """Unpickle the ``torch.save`` zip archive at ``path`` with every non-torch global replaced by a stand-in, and
    return it converted by ``to_plain``.

    ``allow``: module prefixes (``"transformers."``, ``"deepspeed."``, ``"enum."``) under which the file's globals
    must lie; a global outside them raises UnsafePickleError naming it (nothing of the file ran). ``what`` names
    the content in error messages ("TrainingArguments", ...). Tensors come back as CPU tensors.
    """
    p = Path(path)
    prefixes = tuple(allow)
    names = pickle_globals(p)
    outside = [n for n in names if not n.startswith(prefixes)]
    if outside:
        raise UnsafePickleError(
            f"{p}: refused to read the {what}: it names {', '.join(outside[:5])}, outside "
            f"{', '.join(prefixes)}; none of its code was run",
            hint="this file was not written by the library that normally writes it; do not load it with torch")
    stand_ins = [(_stand_in(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip() else ""
        first = reason or type(exc).__name__
        raise UnsafePickleError(f"{p}: refused to read the {what} ({first}); none of its code was run",
                                hint="re-save it from a trusted environment") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(f"{p}: cannot read the {what} ({first})",
                               hint="the file is damaged or incomplete: re-save it") from None
    return to_plain(obj)


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """``obj`` with every StandIn replaced by plain data (see the module docstring); containers are rebuilt as
    dict / list / tuple, other values kept as they are."""
    if _depth > 200:
        raise CorruptFileError("a pickled object nests more than 200 levels deep", hint="re-save it")
    d = _depth + 1
    if isinstance(obj, StandIn):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], Mapping)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state) as pickle's BUILD takes it
        if state is None and len(obj.args) == 1:
            return to_plain(obj.args[0], d)
        if isinstance(state, Mapping) and not obj.args:
            return {CLASS_KEY: obj._global, **{str(k): to_plain(v, d) for k, v in state.items()}}
        return {CLASS_KEY: obj._global, "args": [to_plain(a, d) for a in obj.args], "state": to_plain(state, d)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v, d) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v, d) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v, d) for v in obj)
    return obj
