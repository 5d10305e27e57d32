"""Errors name the parameter they are about once, and each caller spells it its way: the command line as the
command's own option (looked up in the Typer command's parameters), the Python API as its keyword."""

from __future__ import annotations

import json

import pytest
import typer.main
from cli_helpers import assert_one_line_error, invoke
from conftest import CORPUS

import ckptaudit
from ckptaudit.cli.app import app, command_spelling
from ckptaudit.errors import CkptAuditError, DataError, InputNotFoundError, UsageError


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


def test_command_spelling_reads_the_command_parameters():
    command = typer.main.get_command(app).commands["resume-probe"]
    e = UsageError("$lr_mults=-1: multipliers must be positive", "or set $train_steps=5 and $eval_every", param="lr_mults")
    # parameter lr_mult is option --lr-mult; parameter steps is option --train-steps
    assert e.render(command_spelling(command)) == "--lr-mult -1: multipliers must be positive — or set --train-steps 5 " \
                                                 "and --eval-every"
    assert str(e) == "--lr-mults -1: multipliers must be positive — or set --train-steps 5 and --eval-every"
    assert e.message == "--lr-mults -1: multipliers must be positive" and e.template.startswith("$lr_mults=")


def test_text_without_placeholders_is_unchanged():
    e = CkptAuditError("a {context, target} file costs $5", "pay $ later")
    assert str(e) == "a {context, target} file costs $5 — pay $ later" and e.param is None


# The same error through the API (keywords) and the command line (the command's options), at converted sites of
# the data loader and of born-gap: the words around the parameter are the same.


def _cli_as_api(line: str, *pairs: tuple[str, str]) -> str:
    text = line.removeprefix("ckptaudit: error: ")
    for flag, keyword in pairs:
        text = text.replace(flag, keyword)
    return text


def test_task_and_data_together_name_both_parameters(tiny_checkpoint):
    with pytest.raises(DataError) as exc:
        ckptaudit.resume_probe(tiny_checkpoint, task="modadd", data=CORPUS, device="cpu")
    api_text = str(exc.value)
    assert exc.value.param == "data" and api_text == "give either task= or data=, not both"
    line = assert_one_line_error(invoke("resume-probe", tiny_checkpoint, "--task", "modadd", "--data", CORPUS,
                                        "--device", "cpu"), "give either --task or --data, not both")
    assert _cli_as_api(line, ("--task", "task="), ("--data", "data=")) == api_text


def test_seq_len_beyond_the_model_positions(tiny_checkpoint):
    positions = json.loads((tiny_checkpoint / "config.json").read_text())["n_positions"]
    with pytest.raises(DataError) as exc:
        ckptaudit.resume_probe(tiny_checkpoint, data=CORPUS, seq_len=positions + 1, device="cpu")
    api_text = str(exc.value)
    assert exc.value.param == "seq_len"
    assert f"seq_len={positions + 1} exceeds the model's {positions} positions — use seq_len={positions} or less" \
        in api_text and "--" not in api_text
    line = assert_one_line_error(invoke("resume-probe", tiny_checkpoint, "--data", CORPUS, "--seq-len", positions + 1,
                                        "--device", "cpu"),
                                 f"--seq-len {positions + 1} exceeds the model's {positions} positions",
                                 f"use --seq-len {positions} or less")
    assert "seq_len=" not in line
    assert _cli_as_api(line, ("--seq-len ", "seq_len=")) == api_text


def test_missing_contexts_file_points_at_the_shipped_pairs(tmp_path):
    missing = tmp_path / "none.jsonl"
    with pytest.raises(InputNotFoundError) as exc:
        ckptaudit.born_gap("unused-model", missing)
    api_text = str(exc.value)
    assert exc.value.param == "contexts" and "or contexts=near-synonyms (the ten pairs" in api_text
    line = assert_one_line_error(invoke("born-gap", "unused-model", "--contexts", missing),
                                 f"{missing}: no such contexts file", "or --contexts near-synonyms (the ten pairs")
    assert _cli_as_api(line, ("--contexts ", "contexts=")) == api_text


def test_an_alias_of_an_option_is_spelled_as_the_option():
    """fisher's run option is ``--run`` (alias ``--backbone-run``), the API keyword ``backbone_run``."""
    from ckptaudit.errors import keyword_spelling

    command = typer.main.get_command(app).commands["fisher"]
    e = UsageError("$switch needs the run", "give $backbone_run=RUN or a run directory", param="switch")
    assert e.render(command_spelling(command)) == "--switch needs the run — give --run RUN or a run directory"
    assert e.render(keyword_spelling) == "switch= needs the run — give backbone_run=RUN or a run directory"
