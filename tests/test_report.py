"""HDF5 report schema: round trip, provenance attributes, atomic writes."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from ckptaudit.report.hdf5 import SCHEMA_VERSION, InputRecord, read_report, sha256_files, write_report


def test_round_trip_and_root_attributes(tmp_path):
    tree = {
        "k95": 3,
        "label": "A",
        "flag": True,
        "missing": None,
        "sigma": np.array([3.0, 2.0, 1.0]),
        "names": ["q", "k"],
        "sub": {"a": [1.5, 2.5], "step": 7},
        "items": [{"x": 1.0}, {"x": 2.0}],
    }
    inputs = [InputRecord(step=10, path="/r/checkpoint-10", bytes=123, sha256="ab" * 32)]
    p = write_report(tmp_path / "r.h5", command="backbone", argv=["ckptaudit", "backbone", "r"], tree=tree, inputs=inputs)
    back = read_report(p)
    attrs = back["@attrs"]
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["command"] == "backbone"
    assert json.loads(attrs["argv"]) == ["ckptaudit", "backbone", "r"]
    for key in ("ckptaudit_version", "created", "device", "torch_version"):
        assert key in attrs
    assert back["inputs"]["step"].tolist() == [10]
    assert back["inputs"]["sha256"].tolist() == ["ab" * 32]
    g = back["backbone"]
    assert g["@attrs"]["k95"] == 3 and g["@attrs"]["label"] == "A" and bool(g["@attrs"]["flag"])
    assert json.loads(g["@attrs"]["none_attrs"]) == ["missing"]
    np.testing.assert_array_equal(g["sigma"], [3.0, 2.0, 1.0])
    assert g["names"].tolist() == ["q", "k"]
    assert g["sub"]["@attrs"]["step"] == 7
    assert g["items"]["1"]["@attrs"]["x"] == 2.0


def test_failed_write_leaves_nothing(tmp_path):
    class Boom:
        pass

    target = tmp_path / "out.h5"
    with pytest.raises(TypeError):
        write_report(target, command="x", argv=[], tree={"bad": Boom()})
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"hello " * 1000)
    b.write_bytes(b"world")
    assert sha256_files([a, b]) == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()


def test_read_report_rejects_foreign_files(tmp_path):
    from ckptaudit.errors import CorruptFileError

    p = tmp_path / "foreign.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(CorruptFileError):
        read_report(p)
    q = tmp_path / "text.h5"
    q.write_text("not hdf5")
    with pytest.raises(CorruptFileError):
        read_report(q)


def test_tables_never_break_a_number_or_a_word():
    """At 80 columns a wide table keeps every number and every word whole (born-gap's ' yearning', 403,584): the
    table is printed at its own minimum width rather than folding cells."""
    import io

    from ckptaudit.report.console import Output

    buf = io.StringIO()
    out = Output(stream=buf)
    out.console.width = 80
    words = ["yearning", "warmup_boundary", "suspicion"]
    numbers = [403584.0, 0.000623312, 12345678, -1.873]
    out.table("a wide table", [f"column {i}" for i in range(12)],
              [[w, *numbers, *numbers, "x", w, w] for w in words])
    text = buf.getvalue()
    for w in words:
        assert w in text
    for n in ("4.036e+05", "6.233e-04", "12345678", "-1.873"):
        assert n in text
    assert out.console.width == 80  # restored after the table


def test_progress_counts_in_human_units_and_eta_from_the_average_rate():
    """The bar's count and time left, rendered from a rich task driven by a planted clock: exact counts below
    10,000, k/M/G above; the ETA is elapsed x (total - done) / done and stays shown when one unit takes minutes
    (rich's own column averages over the last 30 s only and shows -:--:-- then)."""
    from rich.progress import Progress

    from ckptaudit.report.console import CountColumn, EtaColumn, clock, human_count

    assert [human_count(n) for n in (0, 173, 9_999, 12_345, 1_207_959_552)] == ["0", "173", "9,999", "12.3k", "1.21G"]
    assert clock(100) == "0:01:40" and clock(3725) == "1:02:05" and clock(None) == "-:--:--"
    now = [0.0]
    p = Progress(get_time=lambda: now[0], auto_refresh=False, disable=True)
    task_id = p.add_task("pairs", total=2_415_919_104)
    task = p.tasks[0]
    count, eta = CountColumn("pairs"), EtaColumn()
    assert count.render(task).plain == "0/2.42G pairs" and eta.render(task).plain == "eta -:--:--"
    now[0] = 100.0
    p.update(task_id, completed=1_207_959_552)  # half done in 100 s
    assert count.render(task).plain == "1.21G/2.42G pairs" and eta.render(task).plain == "eta 0:01:40"
    steps = p.add_task("steps", total=4)  # started at t = 100 s
    task2 = p.tasks[1]
    now[0] = 190.0
    p.update(steps, completed=1)  # one 90-second step, then nothing for two minutes
    now[0] = 310.0
    assert eta.render(task2).plain == f"eta {clock(210 * 3 / 1)}"  # 210 s elapsed x 3 left / 1 done
    p.update(steps, completed=4)
    assert eta.render(task2).plain == "eta 0:00:00"
    assert CountColumn().render(p.tasks[1]).plain == "4/4"


def test_a_column_of_reals_has_one_format_and_titles_shorten_long_paths():
    import io

    from ckptaudit.report.console import Output, format_column, human_bytes, shorten_paths

    # fixed point with the decimals giving the smallest value 4 significant digits, for every real of the column
    assert format_column([0.98, 0.98333, 12.5, None, 3]) == ["0.9800", "0.9833", "12.5000", "—", "3"]
    assert format_column([0.5, 403584.0]) == ["5.000e-01", "4.036e+05"]  # one value out of range: all scientific
    assert format_column([1.5, float("nan")]) == ["1.500", "nan"]
    long = "/very/long/prefix/of/folders/fixtures/runs/trainer_lm/seed0/run"
    assert shorten_paths(f"extrapolate — {long}, 6 checkpoints") == "extrapolate — …/seed0/run, 6 checkpoints"
    assert shorten_paths("gate: runs/seed0 (policy p.toml)") == "gate: runs/seed0 (policy p.toml)"
    assert (human_bytes(512), human_bytes(13_000_000), human_bytes(3 * 2**30)) == ("512 B", "12.4 MiB", "3.0 GiB")
    buf = io.StringIO()
    out = Output(stream=buf)
    out.console.width = 80
    out.table(f"backbone — {long}", ["set", "PC1 %"], [["trunk", 98.0], ["block 0", 71.23456]])
    text = buf.getvalue()
    assert "…/seed0/run" in text and "prefix" not in text
    assert "98.00" in text and "71.23" in text  # one format: 4 significant digits of the smallest
