"""A static scanner for pickles of every protocol (0-5): what a pickle would import and call, found without running it.

Loading a pickle runs code through a handful of opcodes: GLOBAL, STACK_GLOBAL and INST name a module attribute
(``os.system``), the EXT codes name one through copyreg's extension registry, and REDUCE, OBJ, INST, NEWOBJ,
NEWOBJ_EX and BUILD (``__setstate__``) call what was named. Without a named global there is nothing to call: a
pickle of plain data (numbers, strings, lists, dicts) runs no code under any unpickler. The scanner walks the
opcode stream with its own table of the 68 opcodes and their argument formats, keeps a model of the stack and the
memo (so that the module and name strings a STACK_GLOBAL pops are known, including when they come from the memo),
and reports every global, every extension code, every persistent id, the calling opcodes and the protocol.

It never imports anything the pickle names and never calls the ``pickle`` module's loader. Malformed input (an
unknown opcode, an argument running past the end, a stack underflow, a missing memo entry, no STOP) raises
:class:`PickleScanError`: such a file cannot be loaded by any unpickler either.

Several pickles may follow each other in one file (torch's legacy format writes five, then raw storage bytes):
``scan_pickles`` scans them in turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LINE = 1 << 20  # text-protocol arguments (GLOBAL names, STRING, INT) longer than this are not real pickles

# opcode byte -> (name, argument format). Formats: see _read_arg.
_OPCODES: dict[int, tuple[str, str]] = {
    ord(c): v for c, v in {
        "(": ("MARK", ""), ".": ("STOP", ""), "0": ("POP", ""), "1": ("POP_MARK", ""), "2": ("DUP", ""),
        "F": ("FLOAT", "line"), "I": ("INT", "line"), "J": ("BININT", "4"), "K": ("BININT1", "1"),
        "L": ("LONG", "line"), "M": ("BININT2", "2"), "N": ("NONE", ""), "P": ("PERSID", "line"),
        "Q": ("BINPERSID", ""), "R": ("REDUCE", ""), "S": ("STRING", "line"), "T": ("BINSTRING", "len4s"),
        "U": ("SHORT_BINSTRING", "len1"), "V": ("UNICODE", "line"), "X": ("BINUNICODE", "len4"),
        "a": ("APPEND", ""), "b": ("BUILD", ""), "c": ("GLOBAL", "line2"), "d": ("DICT", ""),
        "}": ("EMPTY_DICT", ""), "e": ("APPENDS", ""), "g": ("GET", "line"), "h": ("BINGET", "1"),
        "i": ("INST", "line2"), "j": ("LONG_BINGET", "4u"), "l": ("LIST", ""), "]": ("EMPTY_LIST", ""),
        "o": ("OBJ", ""), "p": ("PUT", "line"), "q": ("BINPUT", "1"), "r": ("LONG_BINPUT", "4u"),
        "s": ("SETITEM", ""), "t": ("TUPLE", ""), ")": ("EMPTY_TUPLE", ""), "u": ("SETITEMS", ""),
        "G": ("BINFLOAT", "8"),
        # protocol 2
        "\x80": ("PROTO", "1"), "\x81": ("NEWOBJ", ""), "\x82": ("EXT1", "1"), "\x83": ("EXT2", "2"),
        "\x84": ("EXT4", "4"), "\x85": ("TUPLE1", ""), "\x86": ("TUPLE2", ""), "\x87": ("TUPLE3", ""),
        "\x88": ("NEWTRUE", ""), "\x89": ("NEWFALSE", ""), "\x8a": ("LONG1", "len1"), "\x8b": ("LONG4", "len4s"),
        # protocol 3
        "B": ("BINBYTES", "len4"), "C": ("SHORT_BINBYTES", "len1"),
        # protocol 4
        "\x8c": ("SHORT_BINUNICODE", "len1"), "\x8d": ("BINUNICODE8", "len8"), "\x8e": ("BINBYTES8", "len8"),
        "\x8f": ("EMPTY_SET", ""), "\x90": ("ADDITEMS", ""), "\x91": ("FROZENSET", ""), "\x92": ("NEWOBJ_EX", ""),
        "\x93": ("STACK_GLOBAL", ""), "\x94": ("MEMOIZE", ""), "\x95": ("FRAME", "8"),
        # protocol 5
        "\x96": ("BYTEARRAY8", "len8"), "\x97": ("NEXT_BUFFER", ""), "\x98": ("READONLY_BUFFER", ""),
    }.items()
}

#: Opcodes that call something the pickle named (a global, or an object built from one).
CALLING = frozenset({"REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"})

# Stack effects: (items popped, items pushed) for opcodes that neither use the mark nor need special handling.
_EFFECT: dict[str, tuple[int, int]] = {
    "STOP": (1, 0), "DUP": (1, 2), "FLOAT": (0, 1), "INT": (0, 1), "BININT": (0, 1), "BININT1": (0, 1),
    "LONG": (0, 1), "BININT2": (0, 1), "NONE": (0, 1), "PERSID": (0, 1), "BINPERSID": (1, 1), "REDUCE": (2, 1),
    "BINSTRING": (0, 1), "SHORT_BINSTRING": (0, 1), "BINUNICODE": (0, 1), "APPEND": (2, 1), "BUILD": (2, 1),
    "EMPTY_DICT": (0, 1), "EMPTY_LIST": (0, 1), "SETITEM": (3, 1), "EMPTY_TUPLE": (0, 1), "BINFLOAT": (0, 1),
    "NEWOBJ": (2, 1), "EXT1": (0, 1), "EXT2": (0, 1), "EXT4": (0, 1), "TUPLE1": (1, 1), "TUPLE2": (2, 1),
    "TUPLE3": (3, 1), "NEWTRUE": (0, 1), "NEWFALSE": (0, 1), "LONG1": (0, 1), "LONG4": (0, 1),
    "BINBYTES": (0, 1), "SHORT_BINBYTES": (0, 1), "BINUNICODE8": (0, 1), "BINBYTES8": (0, 1),
    "EMPTY_SET": (0, 1), "NEWOBJ_EX": (3, 1), "BYTEARRAY8": (0, 1), "NEXT_BUFFER": (0, 1),
    "READONLY_BUFFER": (1, 1), "PROTO": (0, 0), "FRAME": (0, 0), "MEMOIZE": (0, 0), "PUT": (0, 0),
    "BINPUT": (0, 0), "LONG_BINPUT": (0, 0), "GLOBAL": (0, 1),
}
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"})
_MARK_OPS = {"POP_MARK": 0, "DICT": 1, "APPENDS": -1, "LIST": 1, "OBJ": 1, "INST": 1, "TUPLE": 1, "SETITEMS": -1,
             "ADDITEMS": -1, "FROZENSET": 1}  # pushes after popping to the mark (-1: the target below stays)


class PickleScanError(ValueError):
    """The bytes are not a well-formed pickle (the message says where and why)."""


@dataclass
class PickleScan:
    """What one or more consecutive pickles need: ``globals`` ("module.name", in order of first use), ``ext_codes``
    (copyreg extension codes), ``calls`` (the calling opcodes used), ``opcodes`` (every opcode name used),
    ``persistent_ids`` (how many PERSID/BINPERSID), ``protocol`` (highest PROTO seen, 0 without one),
    ``computed_globals`` (STACK_GLOBALs whose names are not literal strings: they could name anything),
    ``pickles`` (how many were scanned) and ``end`` (the offset after the last STOP)."""

    globals: list[str] = field(default_factory=list)
    ext_codes: list[int] = field(default_factory=list)
    calls: set[str] = field(default_factory=set)
    opcodes: set[str] = field(default_factory=set)
    persistent_ids: int = 0
    protocol: int = 0
    computed_globals: int = 0
    pickles: int = 0
    end: int = 0

    @property
    def runs_code(self) -> bool:
        """True when loading could call anything at all (a global or extension code is named)."""
        return bool(self.globals or self.ext_codes or self.computed_globals)


_OTHER = object()  # any value on the modelled stack that is not a string


class _Str(str):
    """A string value on the modelled stack (candidate STACK_GLOBAL operand)."""


class _Machine:
    def __init__(self, data: bytes | memoryview, pos: int, scan: PickleScan):
        self.data = memoryview(data)
        self.pos = pos
        self.scan = scan
        self.stack: list[object] = []
        self.marks: list[list[object]] = []
        self.memo: dict[int, object] = {}

    def fail(self, at: int, why: str) -> PickleScanError:
        return PickleScanError(f"byte {at}: {why}")

    # ---------------------------------------------------------------- reading
    def take(self, n: int, at: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(at, f"an argument of {n} bytes runs past the end of the data")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def line(self, at: int) -> bytes:
        end = len(self.data)
        limit = min(end, self.pos + MAX_LINE)
        chunk = bytes(self.data[self.pos:limit])
        nl = chunk.find(b"\n")
        if nl < 0:
            raise self.fail(at, "a text argument without its newline")
        self.pos += nl + 1
        return chunk[:nl]

    def arg(self, fmt: str, at: int) -> object:
        if fmt == "":
            return None
        if fmt in ("1", "2", "4", "4u", "8"):
            n = {"1": 1, "2": 2, "4": 4, "4u": 4, "8": 8}[fmt]
            raw = self.take(n, at)
            return int.from_bytes(raw, "little", signed=fmt == "4")
        if fmt == "line":
            return self.line(at)
        if fmt == "line2":
            return self.line(at), self.line(at)
        n = {"len1": 1, "len4": 4, "len4s": 4, "len8": 8}[fmt]
        size = int.from_bytes(self.take(n, at), "little", signed=fmt == "len4s")
        if size < 0:
            raise self.fail(at, f"negative length {size}")
        return self.take(size, at)

    # ---------------------------------------------------------------- stack model
    def pop(self, at: int, name: str) -> object:
        if not self.stack:
            raise self.fail(at, f"{name} on an empty stack")
        return self.stack.pop()

    def pop_mark(self, at: int, name: str) -> list[object]:
        if not self.marks:
            raise self.fail(at, f"{name} without a MARK")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def run(self) -> None:
        """Scan one pickle from ``pos`` through its STOP."""
        scan = self.scan
        while True:
            at = self.pos
            if at >= len(self.data):
                raise self.fail(at, "the data ends before STOP")
            code = self.data[at]
            self.pos += 1
            try:
                name, fmt = _OPCODES[code]
            except KeyError:
                raise self.fail(at, f"unknown opcode 0x{code:02x}") from None
            value = self.arg(fmt, at)
            scan.opcodes.add(name)
            if name in CALLING:
                scan.calls.add(name)
            if name == "PROTO":
                if not 0 <= int(value) <= 5:  # type: ignore[arg-type]
                    raise self.fail(at, f"unsupported pickle protocol {value}")
                scan.protocol = max(scan.protocol, int(value))  # type: ignore[arg-type]
            elif name == "FRAME":
                if int(value) > len(self.data) - self.pos:  # type: ignore[arg-type]
                    raise self.fail(at, f"a frame of {value} bytes runs past the end of the data")
            elif name in ("GLOBAL", "INST"):
                module, attr = (self._text(v, at) for v in value)  # type: ignore[union-attr]
                self._global(f"{module}.{attr}")
            elif name == "STACK_GLOBAL":
                attr, module = self.pop(at, name), self.pop(at, name)
                if isinstance(module, _Str) and isinstance(attr, _Str):
                    self._global(f"{module}.{attr}")
                else:
                    scan.computed_globals += 1
                self.stack.append(_OTHER)
                continue
            elif name in ("EXT1", "EXT2", "EXT4"):
                if int(value) <= 0:  # type: ignore[arg-type]
                    raise self.fail(at, f"extension code {value} is not positive")
                scan.ext_codes.append(int(value))  # type: ignore[arg-type]
            elif name in ("PERSID", "BINPERSID"):
                scan.persistent_ids += 1
            if name in _MARK_OPS:
                self.pop_mark(at, name)
                keep = _MARK_OPS[name]
                if keep == -1 and not self.stack:
                    raise self.fail(at, f"{name} with nothing below its MARK")
                if keep == 1:
                    self.stack.append(_OTHER)
                continue
            if name == "MARK":
                self.marks.append(self.stack)
                self.stack = []
                continue
            if name == "POP":
                if self.stack:
                    self.stack.pop()
                else:
                    self.pop_mark(at, name)
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                key = self._memo_key(value, at)
                if key not in self.memo:
                    raise self.fail(at, f"{name} of memo entry {key}, which was never stored")
                self.stack.append(self.memo[key])
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not self.stack:
                    raise self.fail(at, f"{name} with nothing to store")
                key = len(self.memo) if name == "MEMOIZE" else self._memo_key(value, at)
                self.memo[key] = self.stack[-1]
                continue
            if name in _STRING_OPS:
                self.stack.append(_Str(self._string(name, value, at)))
                continue
            popped, pushed = _EFFECT[name]
            items = [self.pop(at, name) for _ in range(popped)]
            if name == "STOP":
                return
            if name == "DUP":
                self.stack.extend([items[0], items[0]])
                continue
            if name in ("APPEND", "BUILD", "SETITEM"):
                self.stack.append(items[-1])  # the target stays
                continue
            self.stack.extend([_OTHER] * pushed)

    def _global(self, full: str) -> None:
        if full not in self.scan.globals:
            self.scan.globals.append(full)

    def _text(self, raw: object, at: int) -> str:
        try:
            return bytes(raw).decode("utf-8")  # type: ignore[arg-type]
        except UnicodeDecodeError:
            raise self.fail(at, "a global name that is not UTF-8") from None

    def _memo_key(self, value: object, at: int) -> int:
        if isinstance(value, bytes):
            text = value.decode("ascii", errors="replace")
            if not text.isascii() or not text.isdigit():
                raise self.fail(at, f"memo key {text[:20]!r} is not a number")
            return int(text)
        return int(value)  # type: ignore[arg-type]

    def _string(self, name: str, value: object, at: int) -> str:
        raw = bytes(value)  # type: ignore[arg-type]
        if name == "STRING":
            if len(raw) < 2 or raw[:1] != raw[-1:] or raw[:1] not in (b"'", b'"'):
                raise self.fail(at, "the STRING argument must be quoted")
            raw = raw[1:-1]
        try:
            if name == "UNICODE":
                return raw.decode("raw-unicode-escape")
            if name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                return raw.decode("latin-1")  # module names are ASCII; this only has to be faithful for them
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise self.fail(at, f"{name} holds text that does not decode") from None


def scan_pickle(data: bytes | memoryview, start: int = 0) -> PickleScan:
    """Scan the one pickle that begins at ``start`` of ``data`` (through its STOP). PickleScanError when it is not
    a well-formed pickle."""
    scan = PickleScan()
    m = _Machine(data, start, scan)
    m.run()
    scan.pickles, scan.end = 1, m.pos
    return scan


def scan_pickles(data: bytes | memoryview, start: int = 0, count: int | None = None) -> PickleScan:
    """Scan consecutive pickles from ``start``: ``count`` of them, or (None) until the data ends. The result merges
    what all of them need; ``end`` is the offset after the last STOP. PickleScanError when one is malformed."""
    scan = PickleScan()
    pos = start
    n = 0
    while (count is None and pos < len(data)) or (count is not None and n < count):
        m = _Machine(data, pos, scan)
        try:
            m.run()
        except PickleScanError as exc:
            raise PickleScanError(f"pickle {n + 1}: {exc}") from None
        pos, n = m.pos, n + 1
    scan.pickles, scan.end = n, pos
    return scan


def legacy_torch_magic(scan_data: bytes | memoryview) -> bool:
    """True when ``scan_data`` starts with the magic-number pickle of torch's legacy (non-zip) save format."""
    head = bytes(scan_data[:16])
    return head.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19")


