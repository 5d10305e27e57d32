"""One tree per result: for every command, the --json document and the HDF5 report (read back with h5py through
report.hdf5.read_report) hold the same value under every key they share, at every depth.

Where a result keeps a key in another layout in the report on purpose, its class declares it (HDF5_LAYOUT,
HDF5_AS_TEXT of ckptaudit.report.tree.TreeResult); those keys are compared by the class' own tests. The derivation
itself is checked on a small planted result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke
from test_cli_common import COMMANDS, build_inputs

from ckptaudit.report.hdf5 import read_report, write_report
from ckptaudit.report.tree import TreeResult


def _declared() -> set[str]:
    """Every key some TreeResult declares as kept in another layout (or as text) in the report."""
    # Import the results so that their classes are defined.
    import ckptaudit.analyses.backbone.run  # noqa: F401
    import ckptaudit.analyses.born_gap  # noqa: F401
    import ckptaudit.analyses.cross_seed  # noqa: F401
    import ckptaudit.analyses.embeddings.run  # noqa: F401
    import ckptaudit.analyses.extrapolate.run  # noqa: F401
    import ckptaudit.analyses.finetune  # noqa: F401
    import ckptaudit.analyses.fisher.results  # noqa: F401
    import ckptaudit.analyses.gxs.run  # noqa: F401
    import ckptaudit.analyses.inspect  # noqa: F401
    import ckptaudit.analyses.regimes.run  # noqa: F401
    import ckptaudit.analyses.resume.run  # noqa: F401
    import ckptaudit.gate.result  # noqa: F401

    out, todo = set(), list(TreeResult.__subclasses__())
    while todo:
        cls = todo.pop()
        out |= set(cls.HDF5_LAYOUT) | set(cls.HDF5_AS_TEXT)
        todo.extend(cls.__subclasses__())
    return out


def _items(g: dict) -> dict:
    """A read_report group as key -> value: attributes, the names in none_attrs as None, datasets, subgroups."""
    attrs = dict(g.get("@attrs", {}))
    out = {k: None for k in json.loads(attrs.pop("none_attrs", "[]"))}
    attrs.pop("is_list", None)
    out.update(attrs)
    out.update({k: v for k, v in g.items() if k != "@attrs"})
    return out


def _leaf_equal(j, h) -> bool:
    if j is None or h is None:
        return (j is None or (isinstance(j, float) and math.isnan(j))) and (
            h is None or (isinstance(h, float) and math.isnan(h)))
    if isinstance(j, bool) or isinstance(h, bool):
        return bool(j) == bool(h) and type(j) is type(h)
    if isinstance(j, (int, float)) and isinstance(h, (int, float)):
        return j == h or math.isclose(j, h, rel_tol=1e-12)
    return j == h


def _compare(j, h, path: str, skip: set[str], bad: list[str]) -> int:
    """Append to ``bad`` every path where the JSON value ``j`` and the report's ``h`` differ; returns the number of
    leaves compared."""
    if isinstance(h, dict):
        items = _items(h)
        if h.get("@attrs", {}).get("is_list") is True:
            if not isinstance(j, list) or len(j) != len(items):
                bad.append(f"{path}: list of {len(items)} groups vs {j!r:.60}")
                return 0
            return sum(_compare(v, items[str(i)], f"{path}[{i}]", skip, bad) for i, v in enumerate(j))
        if not isinstance(j, dict):
            bad.append(f"{path}: group vs {type(j).__name__}")
            return 0
        return sum(_compare(j[k], items[k], f"{path}/{k}", skip, bad) for k in sorted(set(items) & set(j) - skip))
    if isinstance(h, np.ndarray):
        hv = [None if isinstance(x, float) and math.isnan(x) else x for x in h.ravel().tolist()]
        jv = np.asarray(j, dtype=object).ravel().tolist() if isinstance(j, list) else j
        if not isinstance(jv, list) or len(jv) != len(hv) or not all(_leaf_equal(a, b) for a, b in zip(jv, hv)):
            bad.append(f"{path}: {hv!r:.80} vs {j!r:.80}")
        return 1
    if not _leaf_equal(j, h):
        bad.append(f"{path}: {h!r:.80} vs {j!r:.80}")
    return 1


@pytest.fixture(scope="module")
def inputs(tiny_run: Path, tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tiny_run, tmp_path_factory.mktemp("result-tree"))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_json_and_report_agree_on_every_shared_key(command, inputs, tmp_path):
    report = tmp_path / "r.h5"
    r = invoke(*COMMANDS[command][0](inputs), "--json", "--out", report)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    tree = read_report(report)
    assert json.loads(tree["summary_json"][0]) == doc  # the report keeps the --json document too
    (top,) = [k for k in tree if k not in ("@attrs", "inputs", "summary_json")]  # the command's one group
    group = tree[top][command.split()[1]] if " " in command else tree[top]  # gxs SUBCOMMAND: /gxs/<subcommand>
    if list(_items(group)) == ["embed"]:  # classify-embeddings: /embeddings/embed, the matrix it classified
        group = group["embed"]
    assert len(set(_items(group)) & set(doc)) >= 2, (sorted(_items(group)), sorted(doc))
    bad: list[str] = []
    n = _compare(doc, group, command, _declared(), bad)
    assert not bad, bad
    assert n >= 3  # leaves compared (an empty list or group holds none)


class _Planted(TreeResult):
    """A result with one key of each declared kind."""

    JSON_ONLY = frozenset({"summary"})
    HDF5_ONLY = frozenset({"big"})
    HDF5_SKIP_NONE = frozenset({"optional"})
    HDF5_AS_TEXT = {"settings": "settings_json"}
    HDF5_LAYOUT = {"rows": "_columns"}

    def to_tree(self) -> dict:
        return {"x": np.float64("nan"), "steps": np.arange(3, dtype=np.int64), "summary": "two rows",
                "big": np.ones((2, 2)), "optional": None, "settings": {"b": 1, "a": [0.5]},
                "rows": [{"step": 0, "v": 1.5}, {"step": 10, "v": 2.5}], "nested": {"y": None, "n": np.int64(4)}}

    @staticmethod
    def _columns(rows: list[dict]) -> dict:
        return {"rows": {k: np.asarray([r[k] for r in rows]) for k in rows[0]}}


def test_both_forms_derive_from_the_one_tree(tmp_path):
    p = _Planted()
    assert p.to_json() == {"x": None, "steps": [0, 1, 2], "summary": "two rows", "optional": None,
                           "settings": {"b": 1, "a": [0.5]}, "rows": [{"step": 0, "v": 1.5}, {"step": 10, "v": 2.5}],
                           "nested": {"y": None, "n": 4}}
    assert type(p.to_json()["nested"]["n"]) is int
    write_report(tmp_path / "p.h5", "planted", [], p.to_hdf5_tree())
    g = read_report(tmp_path / "p.h5")["planted"]
    assert sorted(_items(g)) == ["big", "nested", "rows", "settings_json", "steps", "x"]
    assert math.isnan(g["@attrs"]["x"]) and g["steps"].dtype == np.int64 and g["steps"].tolist() == [0, 1, 2]
    assert g["big"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert json.loads(g["@attrs"]["settings_json"]) == {"a": [0.5], "b": 1}
    assert g["rows"]["step"].tolist() == [0, 10] and g["rows"]["v"].tolist() == [1.5, 2.5]
    assert _items(g["nested"]) == {"y": None, "n": 4}
