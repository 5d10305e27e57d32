"""--steps specs: which checkpoints of a run (by training step or position) an analysis uses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ckptaudit.errors import LayoutError, UsageError
from ckptaudit.io.numbers import parse_int


def format_steps(steps: Sequence[int], limit: int = 20) -> str:
    """``steps`` as a comma-separated list for messages ("none" when empty); more than ``limit`` are shown as
    the first and last ``limit // 2`` around "..."."""
    steps = [int(s) for s in steps]
    if len(steps) <= limit:
        return ", ".join(map(str, steps)) or "none"
    return ", ".join(map(str, steps[: limit // 2])) + ", ..., " + ", ".join(map(str, steps[-(limit // 2):]))


def anchor_index(steps: Sequence[int], anchor_step: int | None) -> int:
    """Position in ``steps`` (a run's steps, ascending) of the anchor checkpoint: the first one when
    ``anchor_step`` is None. UsageError naming --anchor, with the run's steps, when no checkpoint is at that step."""
    steps = [int(s) for s in steps]
    if anchor_step is None:
        return 0
    if int(anchor_step) not in steps:
        raise UsageError(f"--anchor {anchor_step}: no checkpoint at that step", f"steps in the run: {format_steps(steps)}")
    return steps.index(int(anchor_step))


@dataclass(frozen=True)
class StepFilter:
    """A parsed --steps spec (see ``parse_steps``); ``select`` applies it to a run's steps."""

    spec: str
    kind: str  # "list" | "range" | "stride"
    items: tuple[int | str, ...] = ()  # for "list": steps (>= 0), or "first" / "last" / negative positions
    start: int | None = None
    stop: int | None = None
    every: int | None = None

    def select(self, steps: Sequence[int]) -> list[int]:
        """The selected steps of ``steps`` (ascending, unique). LayoutError when a named step does not exist or
        nothing is selected; the message lists the available steps."""
        avail = sorted(set(int(s) for s in steps))
        hint = f"available steps: {format_steps(avail)}"
        if not avail:
            raise LayoutError(f"--steps {self.spec!r}: the run has no checkpoints")
        chosen: list[int] = []
        if self.kind == "list":
            missing = []
            for it in self.items:
                if it == "first":
                    chosen.append(avail[0])
                elif it == "last":
                    chosen.append(avail[-1])
                elif isinstance(it, int) and it < 0:
                    if -it > len(avail):
                        missing.append(str(it))
                    else:
                        chosen.append(avail[it])
                elif it in avail:
                    chosen.append(int(it))
                else:
                    missing.append(str(it))
            if missing:
                raise LayoutError(f"--steps {self.spec!r}: no checkpoint at step {', '.join(missing)}", hint=hint)
        elif self.kind == "stride":
            chosen = avail[:: int(self.every or 1)]
        else:
            lo = avail[0] if self.start is None else self.start
            hi = avail[-1] if self.stop is None else self.stop
            chosen = [s for s in avail if lo <= s <= hi and (self.every is None or (s - lo) % self.every == 0)]
        if not chosen:
            raise LayoutError(f"--steps {self.spec!r} selects no checkpoint", hint=hint)
        return sorted(set(chosen))


def parse_steps(spec: str) -> StepFilter:
    """Parse a --steps spec into a StepFilter. Steps are training steps, except where "position" is said.

    - "100,200,500": exactly these steps (each must exist). Items may also be "first", "last" or a negative
      position ("-1" = last checkpoint, "-2" = the one before).
    - "first" / "last" / "-1": one checkpoint.
    - "100:1000": every existing step s with 100 <= s <= 1000 (inclusive); either end may be left out.
    - "100:1000:200": steps s in [100, 1000] with (s - 100) % 200 == 0; the start is required ("100::200" runs
      to the last step).
    - "::K": every K-th checkpoint by position (the 1st, (K+1)-th, ...), whatever the steps are.

    A malformed spec raises UsageError; a spec naming absent steps fails later, in ``StepFilter.select``.
    """
    s = (spec or "").strip().replace(" ", "")
    bad = UsageError(
        f"--steps {spec!r}: not a step spec",
        hint="use e.g. 100,200,500 | 100:1000 | 100:1000:200 | ::2 | first | last | -1",
    )
    if not s:
        raise bad
    if ":" in s:
        parts = s.split(":")
        if len(parts) > 3 or not all(p == "" or (p.isascii() and p.isdigit()) for p in parts):
            raise bad
        nums = [parse_int(p, "--steps") if p else None for p in parts] + [None] * (3 - len(parts))
        start, stop, every = nums
        if every == 0:
            raise UsageError(f"--steps {spec!r}: the stride must be at least 1")
        if start is None and stop is None and every is not None:
            return StepFilter(spec, "stride", every=every)
        if every is not None and start is None:
            raise UsageError(f"--steps {spec!r}: give the start step the stride counts from (e.g. 0:{stop}:{every})")
        if start is not None and stop is not None and stop < start:
            raise UsageError(f"--steps {spec!r}: the range ends before it starts")
        return StepFilter(spec, "range", start=start, stop=stop, every=every)
    items: list[int | str] = []
    for it in s.split(","):
        low = it.lower()
        if low in ("first", "last"):
            items.append(low)
        elif re.fullmatch(r"-?[0-9]+", it):
            items.append(parse_int(it, "--steps"))
        else:
            raise bad
    return StepFilter(spec, "list", items=tuple(items))


