"""The one output sink of the CLI: rich tables on a terminal, a JSON document with --json, silence with --quiet.

Analyses never print; commands hand their results to an :class:`Output`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from ckptaudit.report.tree import to_jsonable


class Output:
    """Human output (rich), machine output (--json) or none (--quiet), chosen once per command."""

    def __init__(self, json_mode: bool = False, quiet: bool = False, stream=None):
        self.json_mode = json_mode
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stdout
        # Human text goes to stdout unless JSON owns stdout; then it goes to stderr (and only when asked).
        self.console = Console(file=self.stream, highlight=False, soft_wrap=False, width=120 if not self.stream.isatty() else None)
        self.err = Console(file=sys.stderr, highlight=False)
        self._end: list[str] = []

    @property
    def human(self) -> bool:
        return not (self.json_mode or self.quiet)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.human:
            self.console.print(*objects, **kwargs)

    def table(self, title: str, columns: list[str], rows: Iterable[Iterable[Any]], caption: str | None = None) -> None:
        """Print a table of already-formatted cells (numbers are formatted with :func:`fmt`)."""
        if not self.human:
            return
        t = Table(title=shorten_paths(title), caption=caption, title_justify="left", show_lines=False)
        raw = [list(r) for r in rows]
        n_cols = max([len(columns)] + [len(r) for r in raw])
        by_column = [format_column([r[i] for r in raw if i < len(r)]) for i in range(n_cols)]
        cells = [[by_column[i][j] for i in range(len(r))] for j, r in enumerate(raw)]
        for i, c in enumerate(columns):
            column = [r[i] for r in cells if i < len(r)]
            if column and all(_NUMBER_RE.fullmatch(_plain_text(v)) for v in column):
                # a number is never broken across lines
                t.add_column(c, no_wrap=True, justify="right", min_width=max(len(_plain_text(v)) for v in column))
            else:
                # text wraps between words, never inside one (a long path folds only past 40 characters)
                longest = max((len(w) for v in column for w in _plain_text(v).split()), default=1)
                t.add_column(c, overflow="fold", min_width=min(max(longest, len(c.split()[0]) if c else 1), 40))
        for r in cells:
            t.add_row(*r)
        # A table whose columns cannot shrink to the console is printed at its own minimum width: a long line
        # beats a cropped column.
        size = Measurement.get(self.console, self.console.options.update_width(10_000), t)
        width = self.console.width
        try:
            # rich's minimum of a table can undercount columns that must not wrap; a table that does not fit is
            # printed at its natural width instead
            self.console.width = width if size.minimum <= width else max(size.maximum, width)
            self.console.print(t)
        finally:
            self.console.width = width

    def json(self, payload: dict) -> None:
        if self.json_mode:
            self.stream.write(json.dumps(to_jsonable(payload), indent=2, sort_keys=False) + "\n")
            self.stream.flush()

    def at_end(self, message: str) -> None:
        """A note printed after the command's results (see ``flush_end``)."""
        self._end.append(message)

    def flush_end(self) -> None:
        """Print the notes kept by ``at_end``, once."""
        pending, self._end = self._end, []
        for message in pending:
            self.note(message)

    def note(self, message: str) -> None:
        """A one-line remark for humans (written to stderr when stdout carries JSON)."""
        if self.quiet:
            return
        (self.err if self.json_mode else self.console).print(message, soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: int | None, unit: str = "") -> Iterator[Any]:
        """A rich progress bar on a TTY; a no-op advancer otherwise (CI, pipes, --quiet, --json). ``unit`` names
        what is counted ("steps", "pairs"); counts of 10,000 and more show in k / M / G."""
        if self.quiet or not sys.stderr.isatty():
            yield _NullBar()
            return
        with Progress(*progress_columns(unit), console=self.err, transient=True) as p:
            task = p.add_task(description, total=total)
            yield _Bar(p, task)


def human_count(n: float) -> str:
    """A count for a progress bar: exact below 10,000 (``9,999``), else three significant digits with k / M / G
    (``12.3k``, ``1.21G``)."""
    n = float(n)
    if abs(n) < 10_000:
        return f"{n:,.0f}"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:,.0f}"  # pragma: no cover - unreachable


def clock(seconds: float | None) -> str:
    """``H:MM:SS`` for a duration in seconds, ``-:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class CountColumn(ProgressColumn):
    """``done/total unit`` in human units (``1.21G/4.83G pairs``); ``done unit`` while the total is unknown."""

    def __init__(self, unit: str = ""):
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        done = human_count(task.completed)
        text = done if task.total is None else f"{done}/{human_count(task.total)}"
        return Text(f"{text} {self.unit}".rstrip(), style="progress.download")


class EtaColumn(ProgressColumn):
    """Time left from the average rate since the bar started: elapsed x (total - done) / done. rich's own column
    estimates from the last 30 s only, so its ETA vanishes when one unit of work takes longer than that."""

    max_refresh = 0.5

    def render(self, task: Any) -> Text:
        if task.finished:
            return Text("eta 0:00:00", style="progress.remaining")
        left = None
        if task.total is not None and task.completed > 0 and task.elapsed:
            left = task.elapsed * (task.total - task.completed) / task.completed
        return Text(f"eta {clock(left)}", style="progress.remaining")


def progress_columns(unit: str = "") -> tuple:
    """The columns of every progress bar: description, bar, count, elapsed time, time left."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), CountColumn(unit), TimeElapsedColumn(), EtaColumn())


class _Bar:
    def __init__(self, progress: Progress, task: Any):
        self._p, self._t = progress, task

    def advance(self, n: float = 1) -> None:
        self._p.advance(self._t, n)

    def set_total(self, total: float) -> None:
        self._p.update(self._t, total=total)

    def stage(self, description: str, total: float | None) -> None:
        """Close the current bar and start a new one (one bar per condition / checkpoint / context)."""
        self._p.update(self._t, visible=False)
        self._t = self._p.add_task(description, total=total)


class _NullBar:
    def advance(self, n: float = 1) -> None:
        pass

    def set_total(self, total: float) -> None:
        pass

    def stage(self, description: str, total: float | None) -> None:
        pass


_NUMBER_RE = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?(?:e[-+]?\d+)?%?|nan|inf|-inf|—)", re.I)
_MARKUP_RE = re.compile(r"\[/?[a-z #0-9]*\]")


def _plain_text(cell: str) -> str:
    """A cell without its rich colour markup ([green]...[/green])."""
    return _MARKUP_RE.sub("", cell)


def _is_real(x: Any) -> bool:
    return isinstance(x, (float, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def format_column(values: list[Any]) -> list[str]:
    """The cells of one table column, the reals of a column in one format: fixed point with the decimals that give
    the smallest nonzero value 4 significant digits (at most 6), or, when a nonzero value is >= 1e5 or < 1e-3,
    scientific with 4 significant digits for all. Integers, None, booleans and text as :func:`fmt`."""
    reals = [abs(float(x)) for x in values if _is_real(x)]
    nonzero = [x for x in reals if x != 0]
    if not nonzero:
        return [fmt(x) for x in values]
    if any(x >= 1e5 or x < 1e-3 for x in nonzero):
        return [f"{float(x):.3e}" if _is_real(x) else fmt(x) for x in values]
    decimals = max(0, min(6, 3 - math.floor(math.log10(min(nonzero)))))
    return [f"{float(x):.{decimals}f}" if _is_real(x) else fmt(x) for x in values]


_PATH_RE = re.compile(r"(?:[\w.~-]*/)+[\w.-]+/?")


def shorten_paths(text: str, keep: int = 2, limit: int = 40) -> str:
    """``text`` with every path longer than ``limit`` characters cut to its last ``keep`` components
    (``…/seed0/run``), so a table title does not wrap on a long path."""
    def cut(m: re.Match) -> str:
        path = m.group(0)
        parts = [p for p in path.rstrip("/").split("/") if p]
        return path if len(path) <= limit or len(parts) <= keep else "…/" + "/".join(parts[-keep:])

    return _PATH_RE.sub(cut, text)


def human_bytes(n: float) -> str:
    """A size in bytes with binary units: ``512 B``, ``12.4 MiB``, ``1.21 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - unreachable


def fmt(x: Any) -> str:
    """Format one table cell: floats with 4 significant digits, None as '—'."""
    if x is None:
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.4g}"
    return str(x)


class ProgressHook:
    """What analyses receive to report progress without knowing about rich: ``hook(n)`` advances by n."""

    def __init__(self, bar: Any = None):
        self._bar = bar

    def __call__(self, n: float = 1) -> None:
        if self._bar is not None:
            self._bar.advance(n)

    def set_total(self, total: float) -> None:
        """Give the bar its end once the amount of work is known (a no-op without a bar)."""
        if self._bar is not None:
            self._bar.set_total(total)

    def stage(self, description: str, total: float | None) -> None:
        """Start the bar of the next unit of work (a condition, a checkpoint, a context) with its own total and ETA."""
        if self._bar is not None:
            self._bar.stage(description, total)


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """A one-line sketch of a series (for a(t) and ||r(t)|| side by side)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] if v is not None else " " for v in values)
