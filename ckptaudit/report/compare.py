"""Line up the same quantities from several HDF5 reports of one command (runs, seeds, checkpoints).

Reports are read with :func:`ckptaudit.report.hdf5.read_report`. A quantity is addressed by a path inside the
report's result group(s): ``backbone/trunk/k95`` (an attribute), ``backbone/trunk/rho[0]`` (one entry of a dataset,
negative indices count from the end), ``regimes/similarity`` (a whole 1-D dataset: a series). A component with
``*`` matches the one group it fits (``fisher/step_*/anisotropy`` lines up reports of different checkpoints); the
automatic lists use ``step_*`` wherever a report has a single per-checkpoint group. A series is plotted
against the ``steps`` dataset of its own group when their lengths match (``x`` overrides), else against its index.

Which quantities: for ``backbone``, ``regimes`` and ``classify-embeddings`` a list of headline quantities (with the
path of each one's standard error where the report has one); for every other command, all numeric attributes and
all series that every report holds. ``--quantity PATH`` (repeatable) chooses them instead; ``--all`` adds every
common numeric attribute to the headline list.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptaudit.errors import DataError, UsageError


@dataclass(frozen=True)
class Spec:
    """A quantity to line up: ``path`` in the report, an optional ``se`` path (its standard error) and, for
    series, an optional ``x`` path (default: the group's ``steps``)."""

    name: str
    path: str
    se: str | None = None
    x: str | None = None


#: Headline quantities per command (scalars, then series). Missing paths are skipped (older reports, options off).
HEADLINES: dict[str, tuple[list[Spec], list[Spec]]] = {
    "backbone": ([
        Spec("trunk PC1 share rho_1", "backbone/trunk/rho[0]"),
        Spec("trunk k95", "backbone/trunk/k95"),
        Spec("trunk k99", "backbone/trunk/k99"),
        Spec("trunk final backbone fraction f_b", "backbone/trunk/f_b[-1]"),
        Spec("trunk mean c(w) vs global backbone", "backbone/trunk/window_alignment_mean"),
        Spec("trunk mean rotation window w vs w+1", "backbone/trunk/window_rotation_mean"),
        Spec("trunk mean local rotation", "backbone/trunk/local_window_rotation_mean"),
        Spec("trunk exponent of |a(t)|", "backbone/trunk/loglog_a/slope", se="backbone/trunk/loglog_a/slope_se"),
        Spec("trunk exponent of ||r(t)||", "backbone/trunk/loglog_r_norm/slope",
             se="backbone/trunk/loglog_r_norm/slope_se"),
        Spec("trunk |cos(v_b, row-normalised v_b)|", "backbone/trunk/rownorm_backbone_abs_cos"),
        Spec("trunk sign-flip step t*", "backbone/trunk/sign_flip_step"),
        Spec("G consolidation step", "backbone/group_G/consolidation_step"),
        Spec("S consolidation step", "backbone/group_S/consolidation_step"),
    ], [
        Spec("trunk a(t)", "backbone/trunk/a"),
        Spec("trunk ||r(t)||", "backbone/trunk/r_norm"),
        Spec("trunk c(w)", "backbone/trunk/window_alignment", x="backbone/trunk/window_start_step"),
        Spec("trunk C(t)", "backbone/trunk/update_alignment"),
    ]),
    "regimes": ([
        Spec("threshold low", "regimes/thresholds/low"),
        Spec("threshold high", "regimes/thresholds/high"),
        Spec("stable checkpoints", "regimes/counts/stable"),
        Spec("transition checkpoints", "regimes/counts/transition"),
        Spec("chaotic checkpoints", "regimes/counts/chaotic"),
        Spec("first stable step", "regimes/first_entry/stable"),
        Spec("first chaotic step", "regimes/first_entry/chaotic"),
        Spec("final s_t", "regimes/similarity[-1]", se="regimes/bootstrap/similarity_se[-1]"),
        Spec("mean bootstrap regime agreement", "regimes/bootstrap/regime_agreement_mean"),
        Spec("final activation variance", "regimes/activation_variance[-1]", se="regimes/activation_variance_se[-1]"),
        Spec("final loss", "regimes/loss[-1]"),
    ], [
        Spec("s_t", "regimes/similarity"),
        Spec("activation variance", "regimes/activation_variance"),
        Spec("loss", "regimes/loss"),
        Spec("loss curvature", "regimes/loss_curvature"),
    ]),
    "classify-embeddings": ([
        Spec("mean c^2", "embeddings/embed/c2/mean", se="embeddings/embed/uncertainty/standard_error/mean_c2"),
        Spec("std c^2", "embeddings/embed/c2/std", se="embeddings/embed/uncertainty/bootstrap/std_c2/se"),
        Spec("fraction |c| > 0.3", "embeddings/embed/frac_abs_c_gt_0_3",
             se="embeddings/embed/uncertainty/standard_error/frac_abs_c_gt_0_3"),
        Spec("fraction |c| > 0.5", "embeddings/embed/frac_abs_c_gt_0_5",
             se="embeddings/embed/uncertainty/standard_error/frac_abs_c_gt_0_5"),
        Spec("KS gauss", "embeddings/embed/ks_gauss", se="embeddings/embed/uncertainty/bootstrap/ks_gauss/se"),
        Spec("KS exp", "embeddings/embed/ks_exp", se="embeddings/embed/uncertainty/bootstrap/ks_exp/se"),
        Spec("bulk index", "embeddings/embed/bulk_index", se="embeddings/embed/uncertainty/bootstrap/bulk_index/se"),
        Spec("class", "embeddings/embed/class"),
        Spec("class agreement (bootstrap)", "embeddings/embed/uncertainty/bootstrap/class_agreement"),
        Spec("predicted critical LoRA lr", "embeddings/embed/predicted_critical_lora_lr"),
    ], []),
}

_MISSING = object()
_INDEX = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<i>-?\d+)\]$")
_SKIP_ATTRS = {"is_list", "none_attrs", "schema_version"}
MAX_GENERIC_ROWS = 40
MAX_SERIES = 6


@dataclass(frozen=True)
class Report:
    """One report: its file, label, command and the tree ``read_report`` returned."""

    path: Path
    label: str
    command: str
    tree: dict = field(repr=False)

    def info(self) -> dict[str, Any]:
        """path, label, created, argv and the checkpoint steps of /inputs (first, last, count)."""
        a = self.tree.get("@attrs", {})
        steps = [int(s) for s in np.asarray(self.tree.get("inputs", {}).get("step", []))]
        return {"path": str(self.path), "label": self.label, "created": a.get("created"),
                "argv": json.loads(a.get("argv", "[]")), "input_steps": steps}


def load_reports(paths: Sequence[Path], labels: Sequence[str] | None = None) -> list[Report]:
    """Read every report (InputNotFoundError / CorruptFileError name the file); all must come from one command."""
    from ckptaudit.report.hdf5 import read_report

    if len(paths) < 2:
        raise UsageError("compare needs at least two reports", "e.g. ckptaudit compare seed0.h5 seed1.h5")
    if labels is not None and len(labels) != len(paths):
        raise UsageError(f"--labels: {len(labels)} label(s) for {len(paths)} reports", "give one label per report")
    trees = [read_report(Path(p)) for p in paths]
    commands = [str(t["@attrs"].get("command", "")) for t in trees]
    if len(set(commands)) > 1:
        other = next(i for i, c in enumerate(commands) if c != commands[0])
        raise UsageError(
            f"{paths[other]} is a `{commands[other]}` report but {paths[0]} is a `{commands[0]}` report",
            "compare lines up reports of one command: pass reports written by the same ckptaudit command")
    if labels is None:
        stems = [Path(p).stem for p in paths]
        labels = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
    return [Report(Path(p), str(lab), c, t) for p, lab, c, t in zip(paths, labels, commands, trees, strict=True)]


def resolve(tree: dict, path: str) -> Any:
    """The value at ``path`` (module docstring): an attribute, a dataset, or one entry ``name[i]`` of a dataset.
    ``None`` for an attribute the report recorded as None; ``_MISSING`` when the path does not exist."""
    parts = [p for p in path.split("/") if p]
    node: Any = tree
    for p in parts[:-1]:
        if isinstance(node, dict) and "*" in p:  # a wildcard component names the one child it matches
            hits = [k for k, v in node.items() if k != "@attrs" and isinstance(v, dict) and fnmatch.fnmatchcase(k, p)]
            p = hits[0] if len(hits) == 1 else ""
        if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
            return _MISSING
        node = node[p]
    if not parts or not isinstance(node, dict):
        return _MISSING
    last = parts[-1]
    m = _INDEX.match(last)
    name, idx = (m.group("name"), int(m.group("i"))) if m else (last, None)
    if name in node and not isinstance(node[name], dict):
        arr = np.asarray(node[name])
        if idx is None:
            return arr
        if arr.ndim != 1 or not -arr.size <= idx < arr.size:
            return _MISSING
        return arr[idx].item() if hasattr(arr[idx], "item") else arr[idx]
    attrs = node.get("@attrs", {})
    if idx is None and name in attrs:
        return attrs[name]
    if idx is None and name in json.loads(attrs.get("none_attrs", "[]")):
        return None
    return _MISSING


def _number(v: Any) -> float | None:
    if isinstance(v, (bool, np.bool_)) or v is None:
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        x = float(v)
        return x if math.isfinite(x) else None
    return None


def _scalar(v: Any) -> Any:
    if v is _MISSING or v is None:
        return None
    if isinstance(v, np.ndarray):
        return None
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


_STEP_GROUP = re.compile(r"^step_\d+$")


def _child_name(node: dict, key: str) -> str:
    """``step_*`` for the only per-checkpoint group (``step_<t>``) of a node, so that reports of different
    checkpoints line up; the key itself otherwise."""
    if _STEP_GROUP.match(key) and sum(1 for k in node if _STEP_GROUP.match(k)) == 1:
        return "step_*"
    return key


def _walk_attrs(node: dict, prefix: str):
    for k, v in node.get("@attrs", {}).items():
        if k not in _SKIP_ATTRS and not k.endswith("_json") and _number(v) is not None:
            yield f"{prefix}{k}"
    for k, v in node.items():
        if k != "@attrs" and isinstance(v, dict):
            yield from _walk_attrs(v, f"{prefix}{_child_name(node, k)}/")


def _walk_series(node: dict, prefix: str):
    steps = node.get("steps")
    n = np.asarray(steps).size if isinstance(steps, np.ndarray) else None
    for k, v in node.items():
        if k == "@attrs":
            continue
        if isinstance(v, dict):
            yield from _walk_series(v, f"{prefix}{_child_name(node, k)}/")
        elif (k != "steps" and n and isinstance(v, np.ndarray) and v.ndim == 1 and v.size == n
              and v.dtype.kind in "fiu"):
            yield f"{prefix}{k}"


def _result_groups(tree: dict) -> list[str]:
    return [k for k, v in tree.items() if k not in ("@attrs", "inputs") and isinstance(v, dict)]


def _common(lists: list[list[str]]) -> list[str]:
    shared = set(lists[0]).intersection(*map(set, lists[1:]))
    return [p for p in lists[0] if p in shared]


def default_specs(reports: Sequence[Report], include_all: bool = False) -> tuple[list[Spec], list[Spec], int]:
    """(scalars, series, omitted) to compare: the command's headlines present in some report (plus every common
    numeric attribute with ``include_all``), or for other commands the first MAX_GENERIC_ROWS common numeric
    attributes (all with ``include_all``; ``omitted`` counts the rest) and the first MAX_SERIES common series."""
    command = reports[0].command
    if command in HEADLINES:
        scalars, series = HEADLINES[command]
        scalars = [s for s in scalars if any(resolve(r.tree, s.path) is not _MISSING for r in reports)]
        series = [s for s in series if all(isinstance(resolve(r.tree, s.path), np.ndarray) for r in reports)]
        if not include_all:
            return scalars, series, 0
    else:
        scalars, series = [], []
    have = {s.path for s in scalars}
    attrs = _common([[p for g in _result_groups(r.tree) for p in _walk_attrs(r.tree[g], f"{g}/")] for r in reports])
    scalars = scalars + [Spec(p, p) for p in attrs if p not in have]
    omitted = 0
    if command not in HEADLINES:
        found = _common([[p for g in _result_groups(r.tree) for p in _walk_series(r.tree[g], f"{g}/")] for r in reports])
        series = [Spec(p, p) for p in found[:MAX_SERIES]]
        if not include_all and len(scalars) > MAX_GENERIC_ROWS:
            omitted = len(scalars) - MAX_GENERIC_ROWS
            scalars = scalars[:MAX_GENERIC_ROWS]
    return scalars, series, omitted


def specs_from_paths(reports: Sequence[Report], paths: Sequence[str]) -> tuple[list[Spec], list[Spec]]:
    """--quantity paths: a 1-D dataset is a series, anything else a scalar; a path no report holds is an error."""
    scalars, series = [], []
    for p in paths:
        values = [resolve(r.tree, p) for r in reports]
        if all(v is _MISSING for v in values):
            groups = ", ".join(_result_groups(reports[0].tree))
            raise DataError(f"--quantity {p}: no report holds it",
                            f"paths start with the result group ({groups}); `ckptaudit report show FILE` lists them")
        arrays = [v for v in values if isinstance(v, np.ndarray)]
        if arrays and all(a.ndim == 1 and a.dtype.kind in "fiu" for a in arrays):
            series.append(Spec(p, p))
        elif arrays:
            raise DataError(f"--quantity {p}: a dataset of shape {arrays[0].shape}",
                            "name one entry, e.g. NAME[0], or a 1-D numeric dataset")
        else:
            scalars.append(Spec(p, p))
    return scalars, series


@dataclass(frozen=True)
class Comparison:
    """Quantities lined up over reports. ``rows``: per scalar, the values (None where a report lacks it), their
    standard errors (or None), and the mean and std (ddof 1) over the reports that hold a number.
    ``series``: per series, for each report the x and y values."""

    command: str
    reports: list[dict]
    rows: list[dict]
    series: list[dict]
    omitted: int = 0

    def to_json(self) -> dict[str, Any]:
        """Keys: command, reports (path, label, created, argv, input_steps), quantities (name, path, values, se,
        mean, std, n), series (name, path, x_path, lines: label, x, y), omitted (common attributes not shown)."""
        from ckptaudit.report.console import to_jsonable

        return to_jsonable({"command": self.command, "reports": self.reports, "quantities": self.rows,
                            "series": self.series, "omitted": self.omitted})


def compare(reports: Sequence[Report], scalars: Sequence[Spec], series: Sequence[Spec], omitted: int = 0) -> Comparison:
    """Line up ``scalars`` and ``series`` over ``reports``."""
    rows = []
    for s in scalars:
        vals = [_scalar(resolve(r.tree, s.path)) for r in reports]
        ses = [_number(_scalar(resolve(r.tree, s.se))) if s.se else None for r in reports]
        nums = [x for x in (_number(v) for v in vals) if x is not None]
        rows.append({"name": s.name, "path": s.path, "values": vals,
                     "se": ses if any(e is not None for e in ses) else None,
                     "mean": float(np.mean(nums)) if nums else None,
                     "std": float(np.std(nums, ddof=1)) if len(nums) > 1 else None, "n": len(nums)})
    lines_out = []
    for s in series:
        lines = []
        for r in reports:
            y = resolve(r.tree, s.path)
            if not isinstance(y, np.ndarray):
                continue
            x_path = s.x or (f"{s.path.rsplit('/', 1)[0]}/steps" if "/" in s.path else "steps")
            x = resolve(r.tree, x_path)
            x = np.asarray(x, dtype=np.float64) if isinstance(x, np.ndarray) and x.size == y.size else np.arange(y.size)
            lines.append({"label": r.label, "x": x.tolist(), "y": np.asarray(y, dtype=np.float64).tolist()})
        lines_out.append({"name": s.name, "path": s.path, "x_path": s.x or "steps of the same group", "lines": lines})
    return Comparison(reports[0].command, [r.info() for r in reports], rows, lines_out, omitted)


def plot_comparison(comp: Comparison, out_dir: Path) -> Path:
    """One PNG, ``compare_<command>.png``: a panel per series (one line per report) and per numeric scalar (one
    point per report, with its standard error as an error bar where known). Returns the file."""
    from ckptaudit.report.plots import _pyplot, _step_axis

    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    numeric = [r for r in comp.rows if r["n"]]
    panels = len(comp.series) + len(numeric)
    if panels == 0:
        raise DataError("compare: nothing numeric to plot in these reports", "choose quantities with --quantity")
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    flat = list(axes.ravel())
    labels = [r["label"] for r in comp.reports]
    for ax, s in zip(flat, comp.series, strict=False):
        for line in s["lines"]:
            ax.plot(line["x"], line["y"], marker=".", ms=3, label=line["label"])
        ax.set_title(s["name"], fontsize=9)
        if "steps" in s["x_path"]:
            _step_axis(ax)  # "training step", integer ticks
        else:
            ax.set_xlabel(s["x_path"].rsplit("/", 1)[-1])
        ax.legend(fontsize=7)
    for ax, r in zip(flat[len(comp.series):], numeric, strict=False):
        xs = [i for i, v in enumerate(r["values"]) if _number(v) is not None]
        ys = [float(r["values"][i]) for i in xs]
        err = [r["se"][i] if r["se"] and r["se"][i] is not None else 0.0 for i in xs]
        ax.errorbar(xs, ys, yerr=err if any(err) else None, fmt="o", capsize=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(r["name"], fontsize=9)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(f"ckptaudit compare — {comp.command} ({len(labels)} reports)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.0 * rows)))  # keep the title clear of the first row
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", comp.command) or "report"
    path = out_dir / f"compare_{safe}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
