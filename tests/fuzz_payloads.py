"""Malicious pickles for the fuzz suite: every protocol (0-5) and every way a pickle calls code. Each touches the
marker file named in it when (and only when) some loader runs it; the tests assert the marker never appears.

``planted(trick, protocol, marker)`` returns (pickle bytes, the global it names as ``module.name``). The tricks:

- REDUCE: ``__reduce__`` -> (os.system, ...), pickled by the pickle module (GLOBAL or STACK_GLOBAL by protocol);
- INST / OBJ: hand-written protocol-0/1 opcodes (the pickle module no longer emits them);
- NEWOBJ / NEWOBJ_EX: a class whose ``__new__`` touches the marker (NEWOBJ_EX with keyword arguments, protocol 4+);
- BUILD: a class whose ``__setstate__`` touches the marker;
- STACK_GLOBAL: hand-written, with the module and name strings taken from the memo (BINGET), protocol 4+;
- EXT: a global registered in copyreg's extension registry, pickled as EXT1/EXT2/EXT4 (protocol 2+).
"""

from __future__ import annotations

import copyreg
import os
import pickle
from pathlib import Path

TRICKS = ("REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4")


def _touch(marker: str) -> None:
    Path(marker).write_text("ran")


class Reduce:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class NewObj:
    """``__new__`` with the marker as its argument: NEWOBJ calls it."""

    def __new__(cls, marker: str = "", **kwargs):
        if marker:
            _touch(marker)
        return object.__new__(cls)

    def __init__(self, marker: str = "", **kwargs):
        self.marker = marker
        self.kwargs = kwargs

    def __getnewargs__(self):
        return (self.marker,)


class NewObjEx(NewObj):
    def __getnewargs_ex__(self):
        return (self.marker,), {"flag": True}

    __getnewargs__ = None  # type: ignore[assignment]


class Build:
    """``__setstate__`` touches the marker: BUILD calls it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __getstate__(self):
        return {"marker": self.marker}

    def __setstate__(self, state):
        _touch(state["marker"])


def _hand(protocol: int, body: bytes) -> bytes:
    return (bytes([0x80, protocol]) if protocol >= 2 else b"") + body


def planted(trick: str, protocol: int, marker: str) -> tuple[bytes, str]:
    """(pickle bytes, "module.name" of the global that would run) for ``trick`` at ``protocol``."""
    sysmod = os.system.__module__  # posix (or nt)
    m = marker.encode()
    if trick == "REDUCE":
        return pickle.dumps(Reduce(marker), protocol=protocol), f"{sysmod}.system"
    if trick == "INST":
        return _hand(protocol, b"(S'touch " + m + b"'\ni" + sysmod.encode() + b"\nsystem\n."), f"{sysmod}.system"
    if trick == "OBJ":
        return _hand(protocol, b"(c" + sysmod.encode() + b"\nsystem\nS'touch " + m + b"'\no."), f"{sysmod}.system"
    if trick in ("NEWOBJ", "NEWOBJ_EX"):
        cls = NewObj if trick == "NEWOBJ" else NewObjEx
        inst = object.__new__(cls)  # built without calling __new__: only the unpickler's NEWOBJ may call it
        inst.marker, inst.kwargs = marker, {}
        return pickle.dumps(inst, protocol=max(protocol, 2 if trick == "NEWOBJ" else 4)), f"{__name__}.{cls.__name__}"
    if trick == "BUILD":
        return pickle.dumps(Build(marker), protocol=protocol), f"{__name__}.Build"
    if trick == "STACK_GLOBAL":
        def s(text: str) -> bytes:
            b = text.encode()
            return b"\x8c" + bytes([len(b)]) + b + b"\x94"  # SHORT_BINUNICODE + MEMOIZE

        cmd = f"touch {marker}".encode()
        body = (s(sysmod) + s("system") + b"0" + b"0"          # memoize both strings, pop them again
                + b"h\x00h\x01\x93"                              # BINGET 0, BINGET 1, STACK_GLOBAL
                + b"X" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R.")  # BINUNICODE, TUPLE1, REDUCE
        return _hand(max(protocol, 4), body), f"{sysmod}.system"
    if trick.startswith("EXT"):
        code = {"EXT1": 0xE1, "EXT2": 0x1E1E, "EXT4": 0x12345678}[trick]
        copyreg.add_extension(sysmod, "system", code)
        try:
            data = pickle.dumps(Reduce(marker), protocol=max(protocol, 2))
        finally:
            copyreg.remove_extension(sysmod, "system", code)
        return data, f"extension code {code}"
    raise ValueError(trick)
