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
