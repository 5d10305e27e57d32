"""Untrusted input, case by case: bounded JSON, numbers, sharded indexes, usage errors, library warnings.

Every CLI case ends in one line on stderr and exit 2 (tests/cli_helpers.assert_one_line_error). The references are
planted: the nesting, the integer, the loop the test writes into the file.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from safetensors.torch import save_file

from ckptaudit.errors import CorruptFileError, UsageError
from ckptaudit.io.jsonio import loads_bounded, read_json
from ckptaudit.io.numbers import INT64_MAX, parse_float, parse_int


def _copy_ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    return Path(shutil.copytree(tiny_checkpoint, run / tiny_checkpoint.name))


# ------------------------------------------------------------------------------------------ bounded JSON


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    f = tmp_path / "deep.json"
    f.write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(CorruptFileError, match="nested more than"):
        read_json(f)
    # just inside the limit parses, one level more is refused (the depth counts the outer object)
    ok = '{"a": ' + "[" * 99 + "]" * 99 + "}"
    assert read_json_text(ok, tmp_path)["a"] == json.loads(ok)["a"]
    with pytest.raises(CorruptFileError, match="nested more than 100"):
        loads_bounded('{"a": ' + "[" * 100 + "]" * 100 + "}", "x.json")


def read_json_text(text: str, tmp_path: Path):
    f = tmp_path / "t.json"
    f.write_text(text)
    return read_json(f)


@pytest.mark.parametrize("doc, match", [
    ('{"global_step": 1180591620717411303424}', "does not fit in 64 bits"),
    ('{"x": -9223372036854775809}', "does not fit in 64 bits"),
    ('{"x": 1' + "0" * 5000 + "}", "does not fit in 64 bits"),
    ('{"a": 1, "a": 2}', "appears twice"),
    ('{"a": 1', "invalid JSON"),
    (b'{"a": "\xff"}', "not UTF-8"),
])
def test_json_limits(doc, match):
    with pytest.raises(CorruptFileError, match=match):
        loads_bounded(doc, "f.json")


def test_json_int64_edges_and_nan_pass():
    doc = loads_bounded(f'{{"a": {INT64_MAX}, "b": {-(2**63)}, "c": NaN}}', "f.json")
    assert doc["a"] == 2**63 - 1 and doc["b"] == -(2**63) and doc["c"] != doc["c"]


def test_wide_integers_are_floats_only_when_asked():
    big = 10**30  # transformers' VERY_LARGE_INTEGER, the model_max_length of many tokenizer_config.json files
    assert loads_bounded(f'{{"n": {big}}}', "f.json", wide_ints=True)["n"] == float(big)
    assert loads_bounded(f'{{"n": {INT64_MAX}}}', "f.json", wide_ints=True)["n"] == INT64_MAX  # still an int
    with pytest.raises(CorruptFileError, match="64 bits"):
        loads_bounded(f'{{"n": {big}}}', "f.json")
    with pytest.raises(CorruptFileError, match="more than 64 digits"):
        loads_bounded('{"n": 1' + "0" * 5000 + "}", "f.json", wide_ints=True)


def test_tokenizer_config_saved_by_transformers_is_a_safe_json_file(trainer_lm):
    from ckptaudit.io.safety import file_safety

    files = sorted((trainer_lm / "seed0" / "run").glob("checkpoint-*/tokenizer_config.json"))
    assert files
    wide = [k for k, v in json.loads(files[0].read_text()).items() if isinstance(v, int) and v > INT64_MAX]
    assert wide, "the fixture's tokenizer_config.json no longer holds an integer beyond int64"
    v = file_safety(files[0])
    assert (v.kind, v.verdict, v.safe) == ("json", "data", True), v


def test_deep_role_map_json_is_one_line(tiny_run, tmp_path):
    f = tmp_path / "roles.json"
    f.write_text('{"roles": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert_one_line_error(invoke("backbone", tiny_run, "--role-map", f, "--no-report"), "roles.json", "nested")


def test_json_size_limit(tmp_path):
    f = tmp_path / "big.json"
    f.write_text(json.dumps({"x": "y" * 1000}))
    with pytest.raises(CorruptFileError, match="more than the 100"):
        read_json(f, max_bytes=100)


@pytest.mark.parametrize("file", ["trainer_state.json", "config.json"])
def test_cli_deep_json_in_checkpoint(tiny_checkpoint, tmp_path, file):
    ck = _copy_ckpt(tiny_checkpoint, tmp_path)
    (ck / file).write_text("[" * 50_000 + "]" * 50_000)
    assert_one_line_error(invoke("inspect", ck.parent, "--no-report"), file, "nested more than")


def test_cli_global_step_beyond_int64(tiny_checkpoint, tmp_path):
    ck = _copy_ckpt(tiny_checkpoint, tmp_path)
    state = json.loads((ck / "trainer_state.json").read_text())
    state["global_step"] = 2**70
    (ck / "trainer_state.json").write_text(json.dumps(state))
    assert_one_line_error(invoke("inspect", ck.parent, "--no-report"), "trainer_state.json", str(2**70))


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("text", ["²", "٣", "1٣", "9223372036854775808", "-9223372036854775809", "1e3", " ", "0x10"])
def test_parse_int_refuses(text):
    with pytest.raises(UsageError):
        parse_int(text, "--x")


def test_parse_int_accepts_ascii_int64():
    assert parse_int(str(INT64_MAX), "--x") == INT64_MAX
    assert parse_int("-12", "--x") == -12


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e999", "٣.5", "1,5", ""])
def test_parse_float_refuses(text):
    with pytest.raises(UsageError):
        parse_float(text, "--x")


@pytest.mark.parametrize("args, needle", [
    (("inspect", "{run}", "--steps", "0:²"), "--steps"),
    (("inspect", "{run}", "--steps", "99999999999999999999"), "64 bits"),
    (("backbone", "{run}", "--seed", str(2**70)), "--seed"),
    (("backbone", "{run}", "--window", "٣"), "--window"),
    (("extrapolate", "{run}", "--K", "99999999999999999999"), "--K"),
    (("backbone", "{run}", "--switch", "10:٣"), "--switch"),
    (("backbone", "{run}", "--blocks", "0-99999999999"), "--blocks"),
    (("fisher", "{run}", "--memory-budget", "nanG"), "--memory-budget"),
    (("extrapolate", "{run}", "--tolerance", "nan"), "--tolerance"),
])
def test_cli_numbers_one_line(tiny_run, args, needle):
    argv = [a.format(run=tiny_run) for a in args] + ["--no-report"]
    assert_one_line_error(invoke(*argv), needle)


# ------------------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("args, needle", [
    (("backbone", "x", "--steps"), "--steps"),           # option without its value
    (("born-gap", "m", "--contexts", "c", "--nucleus", "1.5"), "--nucleus"),   # out of range
    (("finetune-probe", "m", "--contexts", "c", "--train-steps", "0"), "--train-steps"),
    (("inspect", "x", "--no-such-option"), "--no-such-option"),
    (("no-such-command",), "no-such-command"),
    (("inspect",), "path"),                                 # missing argument
])
def test_click_usage_errors_are_one_line(args, needle):
    result = invoke(*args)
    line = assert_one_line_error(result, needle)
    assert "--help" in line and "╭" not in result.stderr


# ------------------------------------------------------------------------------------------ sharded indexes


def _sharded(d: Path) -> Path:
    d.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"c": torch.ones(4)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    return d


def _rewrite_map(d: Path, weight_map: dict, name: str = "model.safetensors.index.json") -> None:
    (d / name).write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_reference_opens(tmp_path):
    from ckptaudit.io.tensors import open_tensors

    d = _sharded(tmp_path / "m")
    with open_tensors(d) as src:
        assert sorted(src.keys()) == ["a", "b", "c"] and torch.equal(src.get("c"), torch.ones(4))


@pytest.mark.parametrize("weight_map, match", [
    ({}, "empty"),
    ({"a": "model.safetensors.index.json"}, "index itself"),
    ({"a": "../model-00001-of-00002.safetensors"}, "leaves the index's folder"),
    ({"a": "/etc/passwd"}, "leaves the index's folder"),
    ({"a": 3}, "shard file name"),
    # a tensor of shard 1 that the map omits, and one that it sends to the other shard
    ({"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}, "omits"),
    ({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
      "c": "model-00002-of-00002.safetensors"}, "places in another shard"),
    ({"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
      "c": "model-00001-of-00002.safetensors"}, "does not hold"),
])
def test_index_refused(tmp_path, weight_map, match):
    from ckptaudit.io.tensors import open_tensors

    d = _sharded(tmp_path / "m")
    _rewrite_map(d, weight_map)
    with pytest.raises(CorruptFileError, match=match):
        with open_tensors(d) as src:
            src.keys()
    assert_one_line_error(invoke("inspect", d, "--no-report"), "model.safetensors.index.json")


def test_two_indexes_naming_each_other(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    _rewrite_map(d, {"a": "other.index.json"})
    _rewrite_map(d, {"a": "model.safetensors.index.json"}, "other.index.json")
    assert_one_line_error(invoke("inspect", d, "--no-report"), "index")


# ------------------------------------------------------------------------------------------ library warnings


def test_library_warnings_become_notes(tiny_run, tmp_path):
    """A transformers logger warning (through transformers' own stderr handler) and a Python warning raised while
    a command runs are kept out of stderr, written to the report's notes, and shown with --verbose."""
    import h5py
    from transformers.utils import logging as tlogging

    from ckptaudit.cli import inspect_cmd

    original = inspect_cmd.LocalSession

    class Noisy(original):  # the command's own setup, plus two library warnings while it runs
        def __init__(self, *a, **k):
            tlogging.get_logger("transformers.modeling_utils").warning("planted transformers warning")
            warnings.warn("planted python warning", UserWarning, stacklevel=1)
            super().__init__(*a, **k)

    inspect_cmd.LocalSession = Noisy
    level = tlogging.get_verbosity()
    tlogging.set_verbosity_warning()  # other tests (the fixture builder) may have silenced transformers
    try:
        quiet = invoke("inspect", tiny_run, "--steps", "last", "--out", tmp_path / "r.h5", "--no-hash")
        loud = invoke("--verbose", "inspect", tiny_run, "--steps", "last", "--no-report")
    finally:
        inspect_cmd.LocalSession = original
        tlogging.set_verbosity(level)
    assert quiet.exit_code == 0, quiet.output
    assert "planted" not in quiet.stderr
    with h5py.File(tmp_path / "r.h5", "r") as f:
        notes = json.loads(f.attrs["notes"])
    assert any("planted transformers warning" in n for n in notes), notes
    assert any("planted python warning" in n for n in notes), notes
    lines = [ln for ln in loud.stderr.splitlines() if ln.startswith("ckptaudit: note:")]
    assert any("planted transformers warning" in ln for ln in lines) and any("python warning" in ln for ln in lines)
    # outside a command, transformers' handler prints as usual: the capture is undone
    assert logging.getLogger("transformers").handlers


# ------------------------------------------------------------------------------------------ report show


def test_report_show_renders_hostile_reports(tmp_path):
    """Bad JSON in argv, bytes that are not UTF-8, names that look like rich markup, a dangling link: every value
    stored as text is shown escaped, the command exits 0, and --json is strict JSON holding the same text."""
    import h5py
    import numpy as np

    from ckptaudit.report.hdf5 import write_report

    path = tmp_path / "r.h5"
    write_report(path, command="inspect", argv=["ckptaudit"], tree={"steps": [1, 2], "name": "ok"})
    with h5py.File(path, "r+") as f:
        f.attrs["argv"] = "{not json"
        f.attrs["raw"] = np.bytes_(b"\xff\xfe bytes")
        g = f.create_group("[red]x[/blue]")
        g.attrs["[bold]k"] = "[/] value"
        g.create_dataset("[i]d[b]", data=np.array([b"\xff", b"ok"], dtype="S2"))
        f["inspect"]["gone"] = h5py.SoftLink("/nowhere/at/all")
        f["inspect"]["loop"] = h5py.SoftLink("/inspect")
    human = invoke("report", "show", path)
    assert human.exit_code == 0, (human.output, human.exception)
    for text in ("{not json", "[red]x[/blue]", "[bold]k", "[/] value", "[i]d[b]", "dangling link to /nowhere/at/all"):
        assert text in human.stdout, text
    doc = json.loads(invoke("report", "show", path, "--json").stdout)
    assert doc["@attrs"]["raw"] == "\ufffd\ufffd bytes"
    assert doc["[red]x["]["blue]"]["[i]d[b]"] == ["\ufffd", "ok"]  # "/" nests groups; the path shows /[red]x[/blue]
    assert doc["inspect"]["gone"] == "<dangling link to /nowhere/at/all>"
    assert doc["inspect"]["loop"] == "<link to /inspect>"


def test_report_show_not_hdf5(tmp_path):
    f = tmp_path / "r.h5"
    f.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    assert_one_line_error(invoke("report", "show", f), "r.h5")


# ------------------------------------------------------------------------------------------ file safety, gate


def _policy(tmp_path: Path) -> Path:
    from cli_helpers import MINIMAL_POLICY

    p = tmp_path / "policy.toml"
    p.write_text(MINIMAL_POLICY)
    return p


def test_protocol0_pickle_as_scheduler_is_not_safe_text(tiny_checkpoint, tmp_path):
    """A text (protocol-0) pickle that names os.system, as scheduler.pt: unsafe, named, never run; a 0-byte
    optimizer.pt and a 3-byte scheduler.pt do not make provenance complete."""
    import os
    import pickle

    marker = tmp_path / "RAN"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ck = _copy_ckpt(tiny_checkpoint, tmp_path)
    (ck / "scheduler.pt").write_bytes(pickle.dumps(Evil(), protocol=0))
    assert (ck / "scheduler.pt").read_bytes().isascii()  # it is "text", and a pickle
    r = invoke("inspect", ck.parent, "--no-report", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    files = {Path(f["path"]).name: f for f in doc["checkpoints"][0]["files"]}
    assert files["scheduler.pt"]["verdict"] == "unsafe" and "system" in files["scheduler.pt"]["detail"]
    assert doc["all_files_safe"] is False
    g = invoke("gate", ck, "--policy", _policy(tmp_path), "--no-report")
    assert_one_line_error(g, "safe_serialization", code=1)
    assert not marker.exists()

    (ck / "optimizer.pt").write_bytes(b"")
    (ck / "scheduler.pt").write_bytes(b"abc")
    doc = json.loads(invoke("inspect", ck.parent, "--no-report", "--json").stdout)
    c = doc["checkpoints"][0]
    assert c["artifacts"]["optimizer"] is False and c["artifacts"]["scheduler"] is False
    assert doc["provenance_complete"] is False
    assert {Path(p).name for p in doc["unreadable_files"]} == {"optimizer.pt", "scheduler.pt"}
    assert_one_line_error(invoke("gate", ck, "--policy", _policy(tmp_path), "--no-report"), "optimizer.pt")


def test_gate_unreadable_weights_is_exit_2_and_writes_nothing(tiny_checkpoint, tmp_path):
    ck = _copy_ckpt(tiny_checkpoint, tmp_path)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data + b"\x00\x00")  # trailing bytes: the library refuses it too
    import safetensors

    with pytest.raises(Exception):  # noqa: B017 - the library's own refusal
        safetensors.deserialize((ck / "model.safetensors").read_bytes())
    outs = [tmp_path / "g.json", tmp_path / "g.xml", tmp_path / "g.sarif", tmp_path / "g.h5"]
    r = invoke("gate", ck, "--policy", _policy(tmp_path), "--json-out", outs[0], "--junit", outs[1], "--sarif", outs[2],
               "--out", outs[3])
    assert_one_line_error(r, "model.safetensors", "not fully covered")
    assert not any(p.exists() for p in outs)


@pytest.mark.parametrize("option", ["--junit", "--sarif", "--json-out", "--out"])
def test_gate_output_paths_checked_before_any_work(tiny_checkpoint, tmp_path, option):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    for bad, needle in ((tmp_path / "a_dir", "is a directory"), (tmp_path / "a_file" / "r.xml", "is a file")):
        other = tmp_path / "other.json"
        r = invoke("gate", tiny_checkpoint, "--policy", _policy(tmp_path), option, bad,
                   *(["--json-out", other] if option != "--json-out" else []))
        assert_one_line_error(r, option, needle)
        assert not other.exists()  # nothing was written before the refusal
    r = invoke("gate", tiny_checkpoint, "--policy", _policy(tmp_path), "--json-out", tmp_path / "same",
               "--junit", tmp_path / "same", "--no-report")
    assert_one_line_error(r, "--json-out", "--junit")


def test_training_args_needs_named_transformers_globals(tiny_checkpoint):
    from ckptaudit.io.plainpickle import load_plain
    from ckptaudit.io.safety import ALLOW_LISTED, TRAINING_ARGUMENTS, file_safety

    v = file_safety(tiny_checkpoint / "training_args.bin")
    assert v.verdict == ALLOW_LISTED and not v.safe
    assert "transformers.training_args.TrainingArguments" in v.globals
    assert all(TRAINING_ARGUMENTS.covers(g) for g in v.globals if not g.startswith(("torch.", "collections.")))
    # the reader the allow-list names reads it, as plain data, with exactly those prefixes
    assert load_plain(tiny_checkpoint / "training_args.bin", TRAINING_ARGUMENTS.prefixes)["__class__"].endswith(
        "TrainingArguments")


def test_dcp_run_passes_safe_serialization(tmp_path):
    """A torch.distributed.checkpoint folder written by dcp.save: .metadata and the .distcp data are safe, and the
    gate's safe_serialization check passes; an object item that names os.system makes its .distcp unsafe."""
    import os
    import warnings as _w

    import torch.distributed.checkpoint as dcp

    from ckptaudit.io.safety import file_safety

    marker = tmp_path / "RAN"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = torch.nn.Linear(4, 3)
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "run" / "step_5"), no_dist=True)
        dcp.save({"model": model.state_dict(), "extra": Evil()}, checkpoint_id=str(tmp_path / "evil"), no_dist=True)
    verdicts = {f.name: file_safety(f) for f in (tmp_path / "run" / "step_5").iterdir()}
    assert verdicts and all(v.safe for v in verdicts.values()), verdicts
    assert any(n.endswith(".distcp") for n in verdicts)
    policy = tmp_path / "p.toml"
    policy.write_text('[checks.safe_serialization]\n')
    r = invoke("gate", tmp_path / "run", "--policy", policy, "--no-report", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["checks"][0]["status"] == "pass"
    evil = [file_safety(f) for f in (tmp_path / "evil").glob("*.distcp")]
    assert evil and all(v.verdict == "unsafe" and "system" in v.detail for v in evil)
    assert not marker.exists()
