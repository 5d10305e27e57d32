"""The gate's checks, each declared once: name, description, policy keys (types, defaults, bounds) and function.

A check is a function ``(GateContext, settings) -> CheckResult`` decorated with :func:`gate_check`, which records
its :class:`Check`. Everything else is derived from these declarations: policy parsing and its error messages
(``gate/policy.py``), the ``gate --init`` template and the policy reference in docs/gate.md
(``gate/reference.py``), and the rule descriptions of the SARIF output (``gate/outputs.py``).
``ckptaudit.gate.checks.CHECKS`` holds them in declaration order, the order of the template, the docs and the messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptaudit.gate.context import GateContext
    from ckptaudit.gate.result import CheckResult

KEY_TYPES = ("bool", "int", "float", "str", "list[str]")
SCOPES = ("target", "run")


@dataclass(frozen=True)
class Key:
    """One allowed policy key: its type ("bool", "int", "float", "str", "list[str]"), default, and constraints.

    ``default=None`` with ``optional=True`` means "no bound": the key may be left out. ``choices`` restricts a str
    or the items of a list[str]; ``minimum``/``maximum``/``positive`` bound numbers. Every integer must fit int64.
    ``help`` is the key's meaning (docs/gate.md and the --init comment). ``default_text`` states a default that is
    not a value ("the analysis' own (50)"); ``type_text`` replaces the derived type column of the docs;
    ``example`` is the value --init shows, commented out, for a key without a default.
    """

    type: str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    optional: bool = False
    default_text: str | None = None
    type_text: str | None = None
    example: Any = None

    def __post_init__(self) -> None:
        if self.type not in KEY_TYPES:
            raise ValueError(f"key type {self.type!r} is not one of {KEY_TYPES}")


ENABLED = Key("bool", True, "Run this check (a table with enabled = false is kept but not run).")

TARGETS = ("last", "all")

GATE_KEYS: Mapping[str, Key] = MappingProxyType({
    "target": Key("str", "last", "Which checkpoints of a run the per-checkpoint checks ({target_checks}) look at: "
                  "the last one (the release) or every one. `--steps` narrows the run first.", choices=TARGETS),
    "fail_on_skipped": Key("bool", False, "A skipped check fails the gate (a check that cannot run here is "
                           "otherwise reported as skipped, never as passed)."),
})  # fmt: skip


@dataclass(frozen=True)
class Check:
    """One gate check as declared with :func:`gate_check`.

    ``keys``: the policy keys of its ``[checks.<name>]`` table, ``enabled`` first. ``needs_one_of``: keys of which
    at least one must be set (a bounds check without a bound could never fail); ``bounds``: (low, high) key pairs
    where low <= high. ``scope``: "target" when it looks at the checkpoints ``[gate] target`` selects, "run" when
    at the whole run. ``doc`` (markdown) and ``value`` (what the result's value holds) go to docs/gate.md;
    ``init_enabled`` and ``init`` (values that differ from the keys' defaults) shape its table in --init.
    """

    name: str
    description: str
    keys: Mapping[str, Key]
    run: Callable[[GateContext, dict], CheckResult]
    needs_one_of: tuple[str, ...] = ()
    bounds: tuple[tuple[str, str], ...] = ()
    scope: str = "target"
    doc: str = ""
    value: str = ""
    init_enabled: bool = True
    init: Mapping[str, Any] = field(default_factory=dict)


_CHECKS: dict[str, Check] = {}


def gate_check(
    name: str,
    description: str,
    keys: Mapping[str, Key],
    *,
    needs_one_of: tuple[str, ...] = (),
    bounds: tuple[tuple[str, str], ...] = (),
    scope: str = "target",
    doc: str = "",
    value: str = "",
    init_enabled: bool = True,
    init: Mapping[str, Any] | None = None,
) -> Callable[[Callable[[GateContext, dict], CheckResult]], Callable[[GateContext, dict], CheckResult]]:
    """Declare the decorated function as the gate check ``name`` (see :class:`Check` for the fields).

    The declaration is checked here, so that a mistake fails at import instead of in a user's CI: a name used
    twice, a bound or an --init value naming no key, an unknown scope.
    """

    def register(fn: Callable[[GateContext, dict], CheckResult]) -> Callable[[GateContext, dict], CheckResult]:
        if name in _CHECKS:
            raise ValueError(f"gate check {name!r} is declared twice")
        if "enabled" in keys:
            raise ValueError(f"gate check {name!r}: 'enabled' is every check's key, not one to declare")
        named = [*needs_one_of, *(k for pair in bounds for k in pair), *(init or {})]
        unknown = [k for k in named if k not in keys]
        if unknown:
            raise ValueError(f"gate check {name!r}: {', '.join(unknown)} not among its keys")
        if scope not in SCOPES:
            raise ValueError(f"gate check {name!r}: scope {scope!r} is not one of {SCOPES}")
        _CHECKS[name] = Check(name=name, description=description, keys=MappingProxyType({"enabled": ENABLED, **keys}),
                              run=fn, needs_one_of=tuple(needs_one_of), bounds=tuple(bounds), scope=scope,
                              doc=doc, value=value, init_enabled=init_enabled,
                              init=MappingProxyType(dict(init or {})))  # fmt: skip
        return fn

    return register
