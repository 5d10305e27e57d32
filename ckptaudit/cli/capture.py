"""Warnings of the libraries ckptaudit drives (transformers, torch, huggingface_hub, peft, ...), captured as notes.

A library that prints its own warnings on stderr would break the one-line error contract (and clutter CI logs).
While a command runs, Python warnings and log records of level WARNING and above are collected instead of
printed: they go into the HDF5 report (root attribute ``notes``) and, with ``ckptaudit --verbose``, to stderr as
``ckptaudit: note: ...`` lines after the command. Nothing is lost: ``--verbose`` shows all of them.

transformers attaches its own stderr handler to the ``transformers`` logger the first time it is imported (which
happens lazily, inside commands). A filter on that handler diverts its records here while a capture is active;
the filter is put on whatever handlers the logger has when capturing starts, and on those added later.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "accelerate", "peft", "torch", "safetensors", "h5py", "gguf")


class _Collector:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def add(self, text: str) -> None:
        line = " ".join(str(text).split())
        if line and line not in self.notes:
            self.notes.append(line)


_active: _Collector | None = None


class _Divert(logging.Filter):
    """On library handlers: while a capture is active, a record becomes a note instead of being printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _active is None:
            return True
        if record.levelno >= logging.WARNING:
            _active.add(f"{record.name}: {record.getMessage()}")
        return False


_DIVERT = _Divert()


class _RootHandler(logging.Handler):
    """On the root logger during a capture: records of libraries without handlers of their own become notes."""

    def emit(self, record: logging.LogRecord) -> None:
        if _active is not None and record.levelno >= logging.WARNING:
            _active.add(f"{record.name}: {record.getMessage()}")


class _LibraryLogger(logging.Logger):
    """The logger class of the library loggers created while a capture is active: a handler the library adds
    later (transformers' own stderr handler) is diverted too."""

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 - logging's API
        if _DIVERT not in hdlr.filters:
            hdlr.addFilter(_DIVERT)
        super().addHandler(hdlr)


def _prepare_library_loggers() -> None:
    manager = logging.Logger.manager
    for name in _LIBRARY_LOGGERS:
        existing = manager.loggerDict.get(name)
        if isinstance(existing, logging.Logger):
            for h in existing.handlers:
                if _DIVERT not in h.filters:
                    h.addFilter(_DIVERT)
            continue
        previous = logging.getLoggerClass()
        logging.setLoggerClass(_LibraryLogger)
        try:
            logging.getLogger(name)
        finally:
            logging.setLoggerClass(previous)


@contextmanager
def capture_library_warnings() -> Iterator[_Collector]:
    """Collect Python warnings and library log records (WARNING and above) as notes while the block runs."""
    global _active
    collector = _Collector()
    outer, _active = _active, collector
    _prepare_library_loggers()
    root = logging.getLogger()
    handler = _RootHandler(logging.WARNING)
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():  # the filters stay as they are: what would have been shown is noted
            def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' API
                collector.add(f"{category.__name__}: {message}")

            warnings.showwarning = show
            yield collector
    finally:
        root.removeHandler(handler)
        _active = outer


def current_notes() -> list[str]:
    """The notes collected so far by the active capture (a copy; empty when none is active)."""
    return list(_active.notes) if _active is not None else []
