"""Shared by the CLI tests: run the app in-process with stderr kept apart, the one-line error contract, and the
smallest gate policy."""

from __future__ import annotations

from typer.testing import CliRunner

from ckptaudit.cli.app import app


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        return CliRunner()


RUNNER = _runner()


def invoke(*args: object, env: dict[str, str] | None = None, reraise: bool = False):
    """``ckptaudit ARGS`` in this process (every argument through str), with ``env`` added to the environment.

    ``reraise``: raise an exception the command let escape, instead of returning it in the result with exit code 1
    (the gate's "failed" code: a crash must not pass for a verdict)."""
    r = RUNNER.invoke(app, [str(a) for a in args], env=env)
    if reraise and r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def assert_one_line_error(result, *needles: str, code: int = 2) -> str:
    """Exit ``code``, one stderr line "ckptaudit: error: ..." holding every needle, no traceback; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("ckptaudit: error:"), err
    for s in needles:
        assert s in err, (s, err)
    return err


# Checks that need no analysis: what every gate test can start from.
MINIMAL_POLICY = """\
[gate]
target = "last"

[checks.provenance]

[checks.safe_serialization]
allow_files = ["training_args.bin"]

[checks.finite]
"""
