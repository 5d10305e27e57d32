"""Every computing command's default (human) output shows its key figures: the command list is the Typer app's own,
each command runs once with --json and once without on the same inputs, and the numbers taken from the JSON
document must appear in the terminal text (to the 4 significant digits the tables print; names and labels as
they are)."""

from __future__ import annotations

import json
import math
import re

import pytest
from cli_helpers import invoke
from test_cli_common import COMMANDS, inputs  # noqa: F401 - the module-scoped inputs fixture

from ckptaudit.cli.manpages import iter_commands, root_command

# Commands that compute nothing of their own (they show, compare or list what others wrote): no figures to check.
NOT_ANALYSES = {"architectures", "compare", "report show"}


def fmt(x: float) -> float:
    """A real the terminal view must show (to 4 significant digits)."""
    return float(x)


def _pct(x: float) -> float:
    return 100 * float(x)


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.I)


def _shown(value: float, numbers: list[float]) -> bool:
    """``value`` is among the printed ``numbers`` to 4 significant digits (NaN as nan)."""
    if math.isnan(value):
        return any(math.isnan(x) for x in numbers)
    return any(abs(x - value) <= 5e-4 * abs(value) + 1e-12 for x in numbers)


def _numbers(text: str) -> list[float]:
    out = []
    for tok in _NUMBER.findall(text):
        try:
            out.append(float(tok.replace(",", "").rstrip(".")))
        except ValueError:
            pass
    return out + ([math.nan] if re.search(r"\bnan\b", text) else [])


def _figures(command: str, d: dict) -> list[str]:
    """The strings the human output of ``command`` must contain, from its --json document ``d``."""
    if command == "inspect":
        return [d["architecture"], *(float(c["n_params"]) for c in d["checkpoints"]),
                *(str(c["step"]) for c in d["checkpoints"])]
    if command == "backbone":
        return [_pct(d["trunk"]["rho"][0]), str(d["trunk"]["k95"]), *(_pct(d["groups"][g]["rho"][0]) for g in "GS"),
                f"anchor step {d['anchor_step']}"]
    if command == "fisher":
        c = d["checkpoints"][-1]
        return [str(d["dim"]), fmt(c["anisotropy"]), fmt(c["anisotropy_exact"]), fmt(c["effective_rank"]),
                fmt(c["noise_floor"]), fmt(c["grad_backbone_cos_mean"])]
    if command == "resume-probe":
        return [d["start_weights_sha256"], str(d["max_safe_reset_lr_mult"]), *(c["verdict"] for c in d["conditions"])]
    if command == "gxs transplant":
        return [str(d["n"]), *(_pct(c["accuracy"]) for c in d["conditions"]), *(fmt(c["loss"]) for c in d["conditions"]),
                *(fmt(c["margin"]) for c in d["conditions"]), *(str(c["params_swapped"]) for c in d["conditions"])]
    if command == "gxs velocity":
        return [*map(fmt, d["velocity_G"]), *map(fmt, d["velocity_S"]), d["order"], str(d["dim_G"]), str(d["dim_S"])]
    if command == "gxs slack":
        return [*(_pct(a) for row in d["accuracy"] for a in row), *(fmt(m) for row in d["margin"] for m in row)]
    if command == "classify-embeddings":
        return [str(d["pairs"]), fmt(d["mean_c2"]), fmt(d["std_c2"]), fmt(d["ks_gauss"]), fmt(d["ks_exp"]),
                fmt(d["bulk_index"]), fmt(d["predicted_critical_lora_lr"])]
    if command == "born-gap":
        return [v for c in d["contexts"] for v in (fmt(c["phi"]), fmt(c["signal"]), fmt(c["drag"]), fmt(c["pr"]),
                                                   str(c["born_rank"]), c["target"], c["competitor"])]
    if command == "finetune-probe":
        return [v for c in d["contexts"] for v in (fmt(c["lr"]), c["character"], str(c["flip_step"]))]
    if command == "regimes":
        fe = d["first_entry"]
        return [*(fmt(s) for s in d["similarity"][1:]), *d["regime"], *(fmt(x) for x in d["loss"]),
                f"first entry: chaotic {fe['chaotic'] or '—'}, transition {fe['transition'] or '—'}, "
                f"stable {fe['stable'] or '—'}"]
    if command == "extrapolate":
        return [fmt(e) for by_k in d["mean_rel_weight_error"].values() for e in by_k.values()] + \
               [str(n) for by_k in d["counts"].values() for n in by_k.values()]
    if command == "cross-seed":
        return [*(fmt(s["final_loss"]) for s in d["seeds"]), *(s["label"] for s in d["seeds"]),
                f"regime agreement (all seeds, matched steps): {d['regime_agreement']:.0%}"]
    if command == "gate":
        return [d["summary"], *(c["name"] for c in d["checks"]), *(c["status"] for c in d["checks"])]
    raise AssertionError(f"no key figures listed for {command}")


def test_every_command_of_the_app_is_covered():
    """A new command must either list its key figures here (and its arguments in test_cli_common.COMMANDS) or be
    named as one that computes nothing."""
    names = {" ".join(path) for path, _ in iter_commands(root_command())}
    assert names - NOT_ANALYSES == set(COMMANDS), (names - NOT_ANALYSES) ^ set(COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_human_output_shows_the_key_figures(command, inputs, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COLUMNS", "250")  # wide enough that no table cell wraps
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "CKPTAUDIT_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    args = COMMANDS[command][0](inputs)
    j = invoke(*args, "--json")
    assert j.exit_code == 0, j.output
    doc = json.loads(j.stdout)
    h = invoke(*args)
    assert h.exit_code == 0, h.output
    text = h.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # the default output is the terminal view, not the JSON document
    figures = _figures(command, doc)
    assert figures
    numbers = _numbers(text)
    missing = [f for f in figures if (f not in text if isinstance(f, str) else not _shown(f, numbers))]
    assert not missing, (missing, text)


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_report_show_renders_the_commands_own_view_and_json(command, inputs, tmp_path, monkeypatch):  # noqa: F811
    """`report show FILE` prints the tables the command printed (every line of its terminal view, in order, after
    the report's provenance); `report show --json` prints the command's own --json document."""
    from ckptaudit.cli.report_cmd import command_views

    monkeypatch.setenv("COLUMNS", "250")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "CKPTAUDIT_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    args = list(COMMANDS[command][0](inputs))
    out = tmp_path / "r.h5"
    j = invoke(*args, "--json", "--out", out)
    assert j.exit_code in (0, 1), j.output
    shown = invoke("report", "show", out, "--json")
    assert shown.exit_code == 0, shown.output
    assert _without_wall_time(json.loads(shown.stdout)) == _without_wall_time(json.loads(j.stdout))
    assert command in command_views(), f"{command} has no view for report show"
    h = invoke(*args, "--out", out)
    printed = [ln for ln in h.stdout.splitlines() if ln.strip()]
    again = [ln for ln in invoke("report", "show", out).stdout.splitlines() if ln.strip()]
    # the inputs table ends at the first closing border; the command's own view follows it
    start = next(i for i, ln in enumerate(again) if ln.startswith("└")) + 1
    view = again[start:]
    assert view, "\n".join(again)
    pos = 0
    for line in view:  # everything report show renders is what the command printed, in the same order
        if "wall time" in line:
            continue
        assert line in printed[pos:], (line, "\n".join(printed))
        pos = printed.index(line, pos) + 1
    titles = [printed[i - 1] for i, ln in enumerate(printed) if ln.startswith("┏") and i > 0]
    assert titles and all(t in view for t in titles), (titles, view)  # and every table of the command is there


def _without_wall_time(x):
    if isinstance(x, dict):
        return {k: _without_wall_time(v) for k, v in x.items() if k not in ("timing_seconds", "seconds", "timing")}
    if isinstance(x, list):
        return [_without_wall_time(v) for v in x]
    return x
