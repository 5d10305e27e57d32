"""`ckptaudit compare`: quantities of several real reports lined up, checked against the files read with h5py, and
the one-line errors for reports of different commands or unreadable files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, invoke

from ckptaudit.report.compare import compare, default_specs, load_reports, resolve, specs_from_paths
from ckptaudit.report.hdf5 import read_report, write_report


@pytest.fixture(scope="module")
def backbone_reports(tiny_run, tmp_path_factory):
    """Two backbone reports of the fixture run: all rows, and the rows up to step 40."""
    d = tmp_path_factory.mktemp("cmp")
    paths = []
    for name, extra in (("full", []), ("early", ["--steps", "0:40"])):
        out = d / f"{name}.h5"
        r = invoke("backbone", tiny_run, "--window", "3", "--out", out, "--no-hash", "--device", "cpu", "-q", *extra)
        assert r.exit_code == 0, r.output
        paths.append(out)
    return paths


def test_backbone_headlines_equal_the_files_and_their_spread(backbone_reports, tmp_path):
    r = invoke("compare", *backbone_reports, "--json", "--plot", tmp_path / "figs")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["command"] == "backbone" and [x["label"] for x in doc["reports"]] == ["full", "early"]
    rows = {q["path"]: q for q in doc["quantities"]}
    files = [h5py.File(p) for p in backbone_reports]
    try:
        want = [float(f["backbone/trunk/rho"][0]) for f in files]
        assert rows["backbone/trunk/rho[0]"]["values"] == pytest.approx(want, rel=1e-12)
        assert rows["backbone/trunk/rho[0]"]["mean"] == pytest.approx(np.mean(want), rel=1e-12)
        assert rows["backbone/trunk/rho[0]"]["std"] == pytest.approx(np.std(want, ddof=1), rel=1e-9)
        assert rows["backbone/trunk/k95"]["values"] == [int(f["backbone/trunk"].attrs["k95"]) for f in files]
        assert rows["backbone/trunk/f_b[-1]"]["values"] == pytest.approx([float(f["backbone/trunk/f_b"][-1]) for f in files])
        slope = rows["backbone/trunk/loglog_a/slope"]
        assert slope["values"] == pytest.approx([f["backbone/trunk/loglog_a"].attrs["slope"] for f in files], rel=1e-12)
        assert slope["se"] == pytest.approx([f["backbone/trunk/loglog_a"].attrs["slope_se"] for f in files], rel=1e-12)
        assert rows["backbone/trunk/sign_flip_step"]["values"] == [None, None]  # recorded as None in both
        a = next(s for s in doc["series"] if s["path"] == "backbone/trunk/a")
        for line, f in zip(a["lines"], files, strict=True):
            assert line["x"] == list(f["backbone/trunk/steps"][()]) and line["y"] == pytest.approx(list(f["backbone/trunk/a"][()]))
        cw = next(s for s in doc["series"] if s["path"] == "backbone/trunk/window_alignment")
        assert cw["lines"][0]["x"] == list(files[0]["backbone/trunk/window_start_step"][()])
    finally:
        for f in files:
            f.close()
    png = (tmp_path / "figs" / "compare_backbone.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    human = invoke("compare", *backbone_reports, "--labels", "all rows,to 40")
    assert human.exit_code == 0 and "all rows" in human.stdout and "trunk exponent of |a(t)|" in human.stdout
    assert "±" in human.stdout  # the exponents carry their standard errors


def test_quantity_paths(backbone_reports):
    loaded = load_reports(backbone_reports)
    scalars, series = specs_from_paths(loaded, ["backbone/trunk/sigma[-1]", "backbone/group_G/k99",
                                                "backbone/block_1/r_norm"])
    assert [s.path for s in scalars] == ["backbone/trunk/sigma[-1]", "backbone/group_G/k99"]
    assert [s.path for s in series] == ["backbone/block_1/r_norm"]
    comp = compare(loaded, scalars, series)
    sig = [read_report(p)["backbone"]["trunk"]["sigma"][-1] for p in backbone_reports]
    assert comp.rows[0]["values"] == pytest.approx(sig, rel=1e-12)
    from ckptaudit.errors import DataError

    with pytest.raises(DataError, match="no report holds it"):
        specs_from_paths(loaded, ["backbone/trunk/nothing"])
    r = invoke("compare", *backbone_reports, "--quantity", "backbone/trunk/u")
    assert r.exit_code == 2  # u is [T, T]: not a series


def _report(path, command, tree, group=None):
    write_report(path, command, ["ckptaudit", command], tree, group=group)
    return path


def test_planted_values_mean_std_and_generic_commands(tmp_path):
    """A command without headlines: every numeric attribute all reports share, lined up; the first rows by default
    and the rest with --all; series against their group's steps."""
    vals = [1.5, 2.5, 4.0]
    paths = [_report(tmp_path / f"s{i}.h5", "gxs velocity", {"score": v, "only_here": i, "label": "x",
                                                             "curve": {"steps": np.arange(3), "y": np.arange(3) * v}})
             for i, v in enumerate(vals)]
    loaded = load_reports(paths)
    scalars, series, omitted = default_specs(loaded)
    paths_seen = [s.path for s in scalars]
    assert "gxs_velocity/score" in paths_seen and "gxs_velocity/only_here" in paths_seen  # numeric, in all three
    assert not any("label" in p for p in paths_seen) and omitted == 0
    comp = compare(loaded, scalars, series)
    row = next(r for r in comp.rows if r["path"] == "gxs_velocity/score")
    assert row["values"] == vals and row["mean"] == pytest.approx(np.mean(vals)) and row["std"] == pytest.approx(np.std(vals, ddof=1))
    assert [s.path for s in series] == ["gxs_velocity/curve/y"]
    assert comp.series[0]["lines"][2]["y"] == [0.0, 4.0, 8.0]
    many = [_report(tmp_path / f"m{i}.h5", "inspect", {f"q{k}": k + i for k in range(50)}) for i in range(2)]
    s40, _, more = default_specs(load_reports(many))
    assert len(s40) == 40 and more == 10
    assert len(default_specs(load_reports(many), include_all=True)[0]) == 50


def test_one_line_errors(backbone_reports, tmp_path):
    other = _report(tmp_path / "other.h5", "regimes", {"similarity": np.ones(3), "steps": np.arange(3)})
    r = invoke("compare", backbone_reports[0], other)
    err = assert_one_line_error(r, "other.h5", "`regimes`", "`backbone`")
    assert "same ckptaudit command" in err
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    assert_one_line_error(invoke("compare", backbone_reports[0], tmp_path / "junk.h5"), "junk.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    assert_one_line_error(invoke("compare", backbone_reports[0], tmp_path / "foreign.h5"), "foreign.h5", "not a ckptaudit report")
    assert_one_line_error(invoke("compare", backbone_reports[0], tmp_path / "missing.h5"), "missing.h5")
    assert_one_line_error(invoke("compare", backbone_reports[0]), "at least two")
    assert_one_line_error(invoke("compare", *backbone_reports, "--labels", "a"), "--labels")


def test_labels_fall_back_to_paths_when_names_repeat(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [_report(tmp_path / d / "run.h5", "inspect", {"n": 1}) for d in ("a", "b")]
    assert [r.label for r in load_reports(paths)] == [str(p) for p in paths]


def test_resolve_addresses_attributes_entries_and_none():
    tree = {"g": {"@attrs": {"k": 3, "none_attrs": json.dumps(["t"])}, "d": np.array([1.0, 2.0, 3.0])}}
    assert resolve(tree, "g/k") == 3 and resolve(tree, "g/d[-1]") == 3.0 and resolve(tree, "g/d[0]") == 1.0
    assert resolve(tree, "g/t") is None
    missing = resolve(tree, "g/d[7]")
    assert missing is resolve(tree, "g/nothing") and missing is resolve(tree, "h/k")


def test_reports_of_different_checkpoints_line_up_through_their_step_group(tmp_path):
    """fisher-style reports keep each checkpoint under step_<t>: one report per checkpoint still lines up."""
    paths = [_report(tmp_path / f"f{t}.h5", "fisher", {f"step_{t}": {"anisotropy": a, "steps": np.arange(2),
                                                                     "q": np.array([a, 2 * a])}})
             for t, a in ((100, 1.5), (200, 3.0))]
    loaded = load_reports(paths)
    scalars, series, _ = default_specs(loaded)
    assert [s.path for s in scalars] == ["fisher/step_*/anisotropy"]
    assert [s.path for s in series] == ["fisher/step_*/q"]
    comp = compare(loaded, scalars, series)
    assert comp.rows[0]["values"] == [1.5, 3.0]
    assert resolve(loaded[0].tree, "fisher/step_*/q[1]") == 3.0
    two = _report(tmp_path / "both.h5", "fisher", {"step_1": {"a": 1.0}, "step_2": {"a": 2.0}})
    from ckptaudit.report.compare import _MISSING

    assert resolve(read_report(two), "fisher/step_*/a") is _MISSING  # ambiguous: name the checkpoint
    assert resolve(read_report(two), "fisher/step_2/a") == 2.0


def test_fisher_headlines_carry_their_standard_errors(tiny_run, tmp_path):
    """Two real fisher reports of one checkpoint (two seeds: other random directions and batches): every headline
    and its standard error equal the attributes read here with h5py."""
    vec = tmp_path / "v.safetensors"
    assert invoke("backbone", tiny_run, "--save-vectors", vec, "--quiet").exit_code == 0
    paths = []
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}.h5"
        r = invoke("fisher", tiny_run, "--steps", "60", "--vectors", vec, "--batches", 4, "--batch-size", 8,
                   "--random", 3, "--bootstrap", 20, "--seed", seed, "--out", out, "--no-hash", "--quiet")
        assert r.exit_code == 0, r.output
        paths.append(out)
    r = invoke("compare", *paths, "--json")
    assert r.exit_code == 0, r.output
    rows = {q["path"]: q for q in json.loads(r.stdout)["quantities"]}
    files = [h5py.File(p) for p in paths]
    try:
        g = [f["fisher/step_60"] for f in files]
        for name, se in (("anisotropy", "anisotropy_se"), ("random_expected", "q_random_se_exact"),
                         ("trace", "trace_se"), ("grad_backbone_projection_mean", "grad_backbone_projection_se")):
            row = rows[f"fisher/step_*/{name}"]
            assert row["values"] == pytest.approx([x.attrs[name] for x in g], rel=1e-12)
            assert row["se"] == pytest.approx([x.attrs[se] for x in g], rel=1e-12)
        q = rows["fisher/step_*/q/backbone"]
        assert q["values"] == pytest.approx([x["q"].attrs["backbone"] for x in g], rel=1e-12)
        assert q["se"] == pytest.approx([x["q_se"].attrs["backbone"] for x in g], rel=1e-12)
        lam = rows["fisher/step_*/top_eigenvalues[0]"]
        assert lam["values"] == pytest.approx([float(x["top_eigenvalues"][0]) for x in g], rel=1e-12)
        assert lam["se"] == pytest.approx([x["bootstrap/se"].attrs["lambda_1"] for x in g], rel=1e-12)
        assert rows["fisher/step_*/q/random_mean"]["values"][0] != rows["fisher/step_*/q/random_mean"]["values"][1]
    finally:
        for f in files:
            f.close()
