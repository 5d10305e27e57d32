"""Errors name the parameter they are about once, and each caller spells it its way: the command line as the
command's own option (looked up in the Typer command's parameters), the Python API as its keyword."""

from __future__ import annotations

import pytest
import typer.main
from cli_helpers import assert_one_line_error, invoke

import ckptaudit
from ckptaudit.cli.app import app, option_spelling
from ckptaudit.errors import CkptAuditError, DataError, UsageError


def test_the_cli_and_the_api_name_the_same_parameter_differently(tiny_run):
    with pytest.raises(DataError) as exc:
        ckptaudit.backbone(tiny_run, metric="no_such_metric", device="cpu")
    e = exc.value
    assert e.param == "metric"
    api_text = str(e)
    assert api_text.startswith("metric=no_such_metric: no trainer_state.json log_history entry"), api_text
    assert "give switches=PEAK:TROUGH" in api_text and "--" not in api_text  # the API's keyword is `switches`
    line = assert_one_line_error(invoke("backbone", tiny_run, "--metric", "no_such_metric", "--device", "cpu"),
                                 "--metric no_such_metric: no trainer_state.json log_history entry",
                                 "give --switch PEAK:TROUGH")
    assert "metric=" not in line and "switches" not in line
    # the same words around the parameter
    assert line.removeprefix("ckptaudit: error: ").replace("--metric ", "metric=").replace(
        "--switch ", "switches=") == api_text


def test_option_spelling_reads_the_command_parameters():
    command = typer.main.get_command(app).commands["resume-probe"]
    e = UsageError("$lr_mults=-1: multipliers must be positive", "or set $train_steps=5 and $eval_every", param="lr_mults")
    # parameter lr_mult is option --lr-mult; parameter steps is option --train-steps
    assert e.render(option_spelling(command)) == "--lr-mult -1: multipliers must be positive — or set --train-steps 5 " \
                                                 "and --eval-every"
    assert str(e) == "--lr-mults -1: multipliers must be positive — or set --train-steps 5 and --eval-every"
    assert e.message == "--lr-mults -1: multipliers must be positive" and e.template.startswith("$lr_mults=")


def test_text_without_placeholders_is_unchanged():
    e = CkptAuditError("a {context, target} file costs $5", "pay $ later")
    assert str(e) == "a {context, target} file costs $5 — pay $ later" and e.param is None
