"""Machine-readable gate results: JSON, JUnit XML (one testcase per check) and SARIF 2.1.0 (one result per failure).

JUnit is what CI systems (GitLab, Jenkins, GitHub test reporters) show per test; SARIF is what code-scanning UIs
(GitHub code scanning) show per finding, located at the file the failed check concerns. Every writer is atomic
(temp file, then rename) so a CI step never picks up a half-written report. ``-`` writes to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path, PurePath
from typing import Any

from ckptaudit import __version__
from ckptaudit.gate.checks import CHECKS
from ckptaudit.gate.result import FAIL, SKIPPED, GateResult
from ckptaudit.report.console import to_jsonable

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
JUNIT_SUITE = "ckptaudit-gate"


def _write(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, or to stdout when ``path`` is '-'."""
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from ckptaudit.errors import UsageError

    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    except OSError as exc:
        raise UsageError(f"{p}: cannot be written ({exc.strerror or exc})", "give a path you can write to") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"{p}: cannot be written ({exc.strerror or exc})", "give a path you can write to") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(to_jsonable(value), sort_keys=True)


# ----------------------------------------------------------------------------------------------------- JSON


def gate_json(result: GateResult) -> dict:
    """{"passed", "run", "policy", "target", "fail_on_skipped", "summary", "checks": [{name, status, value,
    threshold, message, file}]} with strict-JSON values."""
    return to_jsonable(result.to_json())


def write_json(result: GateResult, path: Path | str) -> None:
    _write(path, json.dumps(gate_json(result), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- JUnit


def junit_xml(result: GateResult) -> str:
    """JUnit XML: <testsuites> with one <testsuite name="ckptaudit-gate">, one <testcase> per check.

    A failed check carries <failure message=...>, a skipped one <skipped message=...>; the measured value and the
    threshold go to the testcase's <system-out> so CI shows them next to the verdict.
    """
    failures = sum(c.status == FAIL for c in result.checks)
    skipped = sum(c.status == SKIPPED for c in result.checks)
    counts = {"tests": str(len(result.checks)), "failures": str(failures), "errors": "0", "skipped": str(skipped)}
    root = ET.Element("testsuites", {"name": "ckptaudit", **counts})
    suite = ET.SubElement(root, "testsuite", {"name": JUNIT_SUITE, **counts, "time": "0"})
    props = ET.SubElement(suite, "properties")
    for k, v in (("run", result.run), ("policy", result.policy), ("target", result.target),
                 ("ckptaudit_version", __version__)):  # fmt: skip
        ET.SubElement(props, "property", {"name": k, "value": str(v)})
    for c in result.checks:
        attrs = {"name": c.name, "classname": f"ckptaudit.gate.{c.name}", "time": "0"}
        if c.file:
            attrs["file"] = c.file
        case = ET.SubElement(suite, "testcase", attrs)
        if c.status == FAIL:
            el = ET.SubElement(case, "failure", {"message": c.message, "type": "GateCheckFailed"})
            el.text = f"{c.message}\nvalue: {_short(c.value)}\nthreshold: {_short(c.threshold)}\nfile: {c.file or ''}"
        elif c.status == SKIPPED:
            ET.SubElement(case, "skipped", {"message": c.message})
        out = ET.SubElement(case, "system-out")
        out.text = f"status: {c.status}\nvalue: {_short(c.value)}\nthreshold: {_short(c.threshold)}\n{c.message}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(result: GateResult, path: Path | str) -> None:
    _write(path, junit_xml(result))


# ---------------------------------------------------------------------------------------------------- SARIF


def _uri(file: str | None, fallback: str) -> str:
    """A SARIF artifact URI: relative to the working directory when the file lies under it (what GitHub code
    scanning resolves against the repository root), else an absolute file:// URI."""
    p = Path(file or fallback)
    try:
        rel = p.resolve().relative_to(Path.cwd().resolve())
        return PurePath(rel).as_posix()
    except (ValueError, OSError):
        return p.resolve().as_uri() if p.is_absolute() or p.exists() else PurePath(p).as_posix()


def _rule(name: str) -> dict:
    """The SARIF reporting descriptor of check ``name``, from its declaration."""
    text = CHECKS[name].description if name in CHECKS else name
    return {
        "id": name,
        "name": "".join(w.capitalize() for w in name.split("_")),
        "shortDescription": {"text": text},
        "fullDescription": {"text": text},
        "help": {"text": f"ckptaudit gate check '{name}': {text} See docs/gate.md."},
        "defaultConfiguration": {"level": "error"},
    }


def sarif(result: GateResult) -> dict:
    """A SARIF 2.1.0 log: one rule per check of the policy, one ``error`` result per failed check (located at the
    file the check concerns); skipped checks become tool notifications, never results."""
    rules = [_rule(c.name) for c in result.checks]
    results = []
    for i, c in enumerate(result.checks):
        if c.status != FAIL:
            continue
        results.append(
            {
                "ruleId": c.name,
                "ruleIndex": i,
                "level": "error",
                "message": {"text": f"{c.message} (value: {_short(c.value)}; threshold: {_short(c.threshold)})"},
                "locations": [{"physicalLocation": {"artifactLocation": {"uri": _uri(c.file, result.run)}}}],
                "properties": {"value": to_jsonable(c.value), "threshold": to_jsonable(c.threshold)},
            }
        )
    notes = [
        {"level": "note", "message": {"text": f"{c.name} skipped: {c.message}"}, "associatedRule": {"id": c.name, "index": i}}
        for i, c in enumerate(result.checks)
        if c.status == SKIPPED
    ]
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {"name": "ckptaudit", "version": __version__, "semanticVersion": __version__,
                               "rules": rules}  # fmt: skip
                },
                "invocations": [{"executionSuccessful": True, "toolExecutionNotifications": notes}],
                "results": results,
                "properties": {"passed": result.passed, "run": result.run, "policy": result.policy},
            }
        ],
    }


def write_sarif(result: GateResult, path: Path | str) -> None:
    _write(path, json.dumps(sarif(result), indent=2) + "\n")
