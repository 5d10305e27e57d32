"""`backbone`: uncentered drift-matrix SVD of a run (SPEC section 1), through one streaming Gram pass.

``run_backbone`` resolves the architecture from the anchor checkpoint's tensor shapes and config, builds the
parameter groups (trunk = q, k, v, o, mlp_in, mlp_out weights of every block; one group per analysed block;
role groups G = q, k and S = v, o, mlp), computes every group's Gram in one pass over the checkpoints
(:func:`ckptaudit.analyses.backbone.gram.drift_grams`), and derives all quantities from the Grams
(:mod:`ckptaudit.analyses.backbone.metrics`). Rows are the checkpoints after the anchor (checkpoints before a
later ``anchor_step`` are not used). What to compute is a :class:`BackboneSettings`; V_1..V_k of the trunk go,
in a second pass, to a :class:`~ckptaudit.io.vectors.VectorSink` (a safetensors file streamed tensor by tensor,
or memory).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.analyses.backbone.gram import (
    DEFAULT_CHUNK_ELEMS,
    _as_source,
    _read,
    balanced_shards,
    drift_grams,
    tensor_names_of,
)
from ckptaudit.analyses.backbone.metrics import (
    BackboneResult,
    backbone_from_gram,
    detect_switches,
    switch_cosines,
)
from ckptaudit.errors import DataError, UsageError
from ckptaudit.io.steps import anchor_index, format_steps
from ckptaudit.io.types import CheckpointLike, RunLike
from ckptaudit.io.vectors import BLOCK_PREFIX, VectorSink, vector_sink
from ckptaudit.report.tree import TreeResult

__all__ = ["BackboneReport", "BackboneResult", "BackboneSettings", "backbone_from_gram", "backbone_groups",
           "detect_switches", "run_backbone", "save_backbone_vectors"]


@dataclass(frozen=True, eq=False)
class BackboneReport(TreeResult):
    """Backbone analysis of a run.

    steps: the T drift-row steps (checkpoints after the anchor). trunk / blocks[l] / groups["G" | "S"]:
    BackboneResult of raw rows; experts["<l>.<e>"]: each expert of an analysed block of a mixture-of-experts
    model (its mlp_in and mlp_out weights), empty for dense models; ``normalized``: the same keys for rows
    x(t)/||x(t)|| when asked, else None.
    switches: (peak, trough) steps used; switch_cos: pairwise |cos| between switching directions (trunk).
    dims: scalars per group ("trunk", "block_<l>", "group_G", "group_S"). vectors_path: the --save-vectors file.
    """

    steps: tuple[int, ...]
    anchor_step: int
    trunk: BackboneResult
    blocks: dict[int, BackboneResult]
    groups: dict[str, BackboneResult]
    switches: tuple[tuple[int, int], ...]
    switch_cos: np.ndarray
    dims: dict[str, int]
    settings: dict[str, Any]
    normalized: dict[str, Any] | None = None
    vectors_path: str | None = None
    vector_sigma: tuple[float, ...] = field(default=())
    experts: dict[str, BackboneResult] = field(default_factory=dict)

    def _switch_list(self) -> list[dict[str, Any]]:
        out = []
        def metrics(r: BackboneResult, i: int) -> dict[str, Any]:
            d = {k: v for k, v in r.switches[i].to_json().items() if k not in ("peak", "trough")}
            if r.dynamics is not None and r.dynamics.switches:
                d.update(r.dynamics.switches[i].to_json())
            return d

        for i, (p, q) in enumerate(self.switches):
            d = {"peak": p, "trough": q, **metrics(self.trunk, i)} if self.trunk.switches else {"peak": p, "trough": q}
            d["abs_cos_other"] = [None if not np.isfinite(c) else float(c) for c in self.switch_cos[i]]
            d["blocks"] = {str(b): metrics(r, i) for b, r in self.blocks.items()}
            d["groups"] = {g: metrics(r, i) for g, r in self.groups.items()}
            out.append(d)
        return out

    JSON_ONLY = frozenset({"dims"})
    HDF5_AS_TEXT = {"settings": "settings_json"}
    HDF5_LAYOUT = {"blocks": "_hdf5_blocks", "groups": "_hdf5_groups", "experts": "_hdf5_experts",
                   "switch": "_hdf5_switch", "normalized": "_hdf5_normalized", "vectors": "_hdf5_vectors"}

    def to_tree(self) -> dict[str, Any]:
        """steps, anchor_step, dims, settings, trunk, blocks {"<l>": ...}, groups {"G", "S"} (these two also with
        velocity and consolidation_step), experts {"<l>.<e>": ...} (mixture of experts only), switch (list),
        normalized (or None), vectors (path or None). The report (/backbone) lays the same out as trunk/,
        block_<l>/, group_G/, group_S/, expert_<l>_<e>/ (each with datasets steps, sigma, rho, a, r_norm, f_b,
        window_alignment, update_alignment and attributes k95, k99, sign_flip_step), switch/ (list) with
        switch_abs_cos, normalized/ (same layout), the attribute vectors_path and settings_json."""
        n = self.normalized
        return {
            "steps": np.asarray(self.steps, dtype=np.int64),
            "anchor_step": int(self.anchor_step),
            "dims": dict(self.dims),
            "settings": dict(self.settings),
            "trunk": self.trunk,
            "blocks": {str(b): r for b, r in self.blocks.items()},
            "groups": {g: r.to_json(velocity=True) for g, r in self.groups.items()},
            "experts": dict(self.experts),
            "switch": self._switch_list(),
            "normalized": None if n is None else {"trunk": n["trunk"],
                                                   "blocks": {str(b): r for b, r in n["blocks"].items()},
                                                   "groups": dict(n["groups"])},
            "vectors": self.vectors_path,
        }

    def _hdf5_blocks(self, _: Any) -> dict[str, Any]:
        return {f"block_{b}": r.to_hdf5_tree() for b, r in self.blocks.items()}

    def _hdf5_groups(self, _: Any) -> dict[str, Any]:
        return {f"group_{g}": r.to_hdf5_tree(velocity=True) for g, r in self.groups.items()}

    def _hdf5_experts(self, _: Any) -> dict[str, Any]:
        return {f"expert_{k.replace('.', '_')}": r.to_hdf5_tree() for k, r in self.experts.items()}

    def _hdf5_switch(self, switch: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.switches:
            return {}
        return {"switch": [_flat_switch(d) for d in switch], "switch_abs_cos": self.switch_cos}

    def _hdf5_normalized(self, _: Any) -> dict[str, Any]:
        n = self.normalized
        if n is None:
            return {}
        sub = {"trunk": n["trunk"].to_hdf5_tree()}
        sub.update({f"block_{b}": r.to_hdf5_tree() for b, r in n["blocks"].items()})
        sub.update({f"group_{g}": r.to_hdf5_tree() for g, r in n["groups"].items()})
        return {"normalized": sub}

    def _hdf5_vectors(self, path: str | None) -> dict[str, Any]:
        return {"vectors_path": path}


_SWITCH_SERIES = ("residual_projection", "drift_projection", "capture_pc2_to_k", "capture_perp_pc2_to_k")


def _flat_switch(d: dict[str, Any]) -> dict[str, Any]:
    """A switch entry for HDF5: per-block / per-group metrics as subgroups, lists as datasets."""
    out = {k: v for k, v in d.items() if k not in ("blocks", "groups")}
    for key in ("pc_cos", "abs_cos_other", *_SWITCH_SERIES):
        if key in d:
            out[key] = np.asarray([np.nan if v is None else v for v in d[key]], dtype=np.float64)
    for key in ("blocks", "groups"):
        out[key] = {k: {kk: (np.asarray([np.nan if x is None else x for x in vv], dtype=np.float64)
                             if isinstance(vv, list) else vv) for kk, vv in m.items()} for k, m in d[key].items()}
    return out


def backbone_groups(arch: Any, blocks: Sequence[int] | None = None, include_bias: bool = False) -> dict[str, list]:
    """Parameter groups of the analysis: "trunk" (all blocks), "block_<l>" (``blocks`` or all), "group_G",
    "group_S" (over the whole trunk), and "expert_<l>_<e>" for every expert of an analysed block (mixture of
    experts). Values are lists of Pieces."""
    from ckptaudit.io.roles import GROUPS, TRUNK_ROLES

    trunk = [p for p in arch.select(TRUNK_ROLES, None, include_bias) if p.block is not None]
    if not trunk:
        raise UsageError("the checkpoint has no trunk parameters (q, k, v, o, mlp_in, mlp_out of a block)",
                         "pass $role_map to tell ckptaudit which tensors are the transformer blocks", param="role_map")
    present = sorted({p.block for p in trunk})
    wanted = present if blocks is None else list(blocks)
    missing = [b for b in wanted if b not in present]
    if missing:
        raise UsageError(f"$blocks={missing}: the model has blocks {present[0]}..{present[-1]}", None, param="blocks")
    groups: dict[str, list] = {"trunk": trunk}
    for b in wanted:
        groups[f"block_{b}"] = [p for p in trunk if p.block == b]
    for g, roles in GROUPS.items():
        groups[f"group_{g}"] = [p for p in trunk if p.role in roles]
    for b in wanted:
        for e in sorted({p.expert for p in trunk if p.block == b and p.expert is not None}):
            groups[f"expert_{b}_{e}"] = [p for p in trunk if p.block == b and p.expert == e]
    return groups


def _trainer_log_history(checkpoints: Sequence[CheckpointLike]) -> list[dict]:
    for c in reversed(list(checkpoints)):
        state = c.trainer_state()
        if state and state.get("log_history"):
            return list(state["log_history"])
    return []


@dataclass(frozen=True)
class BackboneSettings:
    """What ``run_backbone`` computes.

    anchor_step: step of the anchor (None: the first checkpoint); rows are the checkpoints after it. blocks: blocks
    analysed one by one (None: all; the trunk and role groups always span every block). window: rows per window of
    c(w) (a run with fewer rows gets one window of all its rows). switches: (peak_step, trough_step) pairs;
    ``metric`` adds the pairs detected in trainer_state log_history. role_map: a user family or overlay (a Family,
    path or dict) for resolve_architecture. top_k_vectors: k of the V_1..V_k a vector sink receives.
    chunk_elems: elements per streamed chunk of the Gram pass. allow_partial_trunk: analyse a trunk that lacks a role
    its family expects in some block (otherwise an error naming what is missing). fit_range: (lo, hi) steps of the
    power-law fits of a(t) and ||r(t)|| (None: every row after the anchor).
    """

    anchor_step: int | None = None
    blocks: Sequence[int] | None = None
    include_bias: bool = False
    window: int = 10
    normalize_rows: bool = False
    switches: Sequence[tuple[int, int]] = ()
    metric: str | None = None
    device: Any = "cpu"
    role_map: Any = None
    top_k_vectors: int = 6
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    allow_partial_trunk: bool = False
    fit_range: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False)
class _Plan:
    """What the passes over the data need, fixed before any data is read."""

    anchor: CheckpointLike
    rows: list[CheckpointLike]
    steps: list[int]
    anchor_step: int
    unused_steps: list[int]
    arch: Any
    groups: dict[str, list]
    pairs: list[tuple[int, int]]

    @property
    def block_ids(self) -> list[int]:
        return sorted(int(k.split("_", 1)[1]) for k in self.groups if k.startswith("block_"))


def run_backbone(
    run: RunLike,
    settings: BackboneSettings | None = None,
    *,
    save_vectors: str | Path | VectorSink | None = None,
    progress: Callable[[float], None] | None = None,
    progress_total: Callable[[float], None] | None = None,
    **options: Any,
) -> BackboneReport:
    """Backbone analysis of ``run`` (a Run: ``.checkpoints`` ordered by step, each with ``.step``, ``.tensors()``,
    ``.config()``, ``.trainer_state()``) with ``settings`` (:class:`BackboneSettings`; keyword ``options`` name
    its fields and override them, e.g. ``run_backbone(run, window=3)``).

    save_vectors: a :class:`~ckptaudit.io.vectors.VectorSink` that receives V_1..V_k (k = top_k_vectors) of the
    trunk and the block backbones in a second pass (:func:`save_backbone_vectors`), or the path of a safetensors
    file for them (a :class:`~ckptaudit.io.vectors.SafetensorsVectorSink`, which never holds D x k floats).

    Progress: the unit is one stored tensor of one checkpoint (anchor included). ``progress_total(units)`` is
    called once, before any data is read, with the units of every pass this process will run (the Gram pass,
    plus the vectors pass); ``progress(u)`` then advances by fractions that add up to that total.

    Several processes: when a torch.distributed process group with more than one rank is initialised (see
    :mod:`ckptaudit.analyses.distributed`; the CLI starts one under torchrun), each rank streams a size-balanced
    share of the tensors, the per-piece Grams are all-reduced, and every rank returns the same report (equal to
    the single-process one). Only rank 0 runs the vectors pass and fills the sink.
    """
    from ckptaudit.analyses import distributed

    s = _settings(settings, options)
    sink = vector_sink(save_vectors)
    plan = _plan(run, s)
    ctx = distributed.active()
    writes_vectors = sink is not None and (ctx is None or ctx.is_main)
    gs = _gram_pass(plan, s, ctx, writes_vectors, progress, progress_total)
    used_window, window_note = _window(int(s.window), len(plan.steps))

    def analyse(name: str, normalize: bool = False) -> BackboneResult:
        return backbone_from_gram(gs.grams[name], plan.steps, window=used_window, normalize_rows=normalize,
                                  switches=plan.pairs, anchor_step=plan.anchor_step, dim=gs.dims[name],
                                  fit_range=s.fit_range)

    trunk = analyse("trunk")
    blocks = {b: analyse(f"block_{b}") for b in plan.block_ids}
    normalized = None
    if s.normalize_rows:
        normalized = {"trunk": analyse("trunk", True),
                      "blocks": {b: analyse(f"block_{b}", True) for b in plan.block_ids},
                      "groups": {g: analyse(f"group_{g}", True) for g in ("G", "S")}}
    vec_sigma: tuple[float, ...] = ()
    if writes_vectors:
        vec_sigma = save_backbone_vectors(sink, plan.rows, plan.anchor, plan.groups["trunk"], trunk, s.top_k_vectors,
                                          device=s.device, progress=progress, blocks=blocks)
    elif sink is not None:  # other ranks: the same sigma as rank 0 writes, nothing written
        vec_sigma = tuple(float(x) for x in trunk.sigma[: _vector_count(trunk.sigma, s.top_k_vectors)])
    return BackboneReport(
        steps=tuple(plan.steps), anchor_step=plan.anchor_step, trunk=trunk, blocks=blocks,
        groups={g: analyse(f"group_{g}") for g in ("G", "S")},
        switches=tuple(plan.pairs),
        switch_cos=(switch_cosines(gs.grams["trunk"], plan.steps, plan.anchor_step, plan.pairs) if plan.pairs
                    else np.zeros((0, 0))),
        dims=dict(gs.dims), settings=_settings_record(s, plan, used_window, window_note), normalized=normalized,
        vectors_path=None if sink is None else sink.location, vector_sigma=vec_sigma,
        experts={k[len("expert_"):].replace("_", "."): analyse(k) for k in plan.groups if k.startswith("expert_")},
    )


def _settings(settings: BackboneSettings | None, options: Mapping[str, Any]) -> BackboneSettings:
    """``settings`` (default :class:`BackboneSettings`) with the fields named in ``options`` replaced."""
    unknown = sorted(set(options) - {f.name for f in fields(BackboneSettings)})
    if unknown:
        raise TypeError(f"run_backbone() got unexpected keyword argument(s) {', '.join(unknown)}")
    return replace(settings or BackboneSettings(), **options)


def _plan(run: RunLike, s: BackboneSettings) -> _Plan:
    """Rows, anchor, architecture, parameter groups and switching pairs of ``run``; refuses what cannot be
    analysed (too few rows, unknown --blocks, switch steps that are not checkpoints) before any data is read."""
    from ckptaudit.io.roles import resolve_architecture

    ckpts = list(run.checkpoints)
    if not ckpts:
        raise UsageError("the run has no checkpoints", None)
    all_steps = [int(c.step) for c in ckpts]
    anchor_idx = anchor_index(all_steps, s.anchor_step)
    anchor = ckpts[anchor_idx]
    rows = ckpts[anchor_idx + 1 :]
    if len(rows) < 2:
        raise UsageError(f"backbone needs at least 2 checkpoints after the anchor (step {anchor.step}), found {len(rows)}",
                         "choose an earlier $anchor or a run with more checkpoints", param="anchor")
    steps = [int(c.step) for c in rows]
    a_step = int(anchor.step)
    with _as_source(anchor) as src:
        shapes = {n: tuple(src.shape(n)) for n in src.keys()}
    arch = resolve_architecture(shapes, anchor.config(), role_map=s.role_map,
                                allow_partial_trunk=s.allow_partial_trunk)
    groups = backbone_groups(arch, s.blocks, s.include_bias)
    pairs = _switch_pairs(ckpts, s, a_step, steps)
    return _Plan(anchor, rows, steps, a_step, all_steps[:anchor_idx], arch, groups, pairs)


def _switch_pairs(ckpts: Sequence[CheckpointLike], s: BackboneSettings, a_step: int,
                  steps: Sequence[int]) -> list[tuple[int, int]]:
    """The given (peak, trough) pairs, then those detected on ``s.metric``; every step must be a row or the anchor."""
    pairs = [(int(p), int(q)) for p, q in s.switches]
    if s.metric is not None:
        history = _trainer_log_history(ckpts)
        if not any(s.metric in e for e in history):
            raise DataError(f"$metric={s.metric}: no trainer_state.json log_history entry holds {s.metric!r}",
                            "name a metric logged by the trainer, or give $switch=PEAK:TROUGH", param="metric")
        pairs += [pq for pq in detect_switches(history, s.metric, [a_step, *steps]) if pq not in pairs]
    valid = {a_step, *steps}
    for p, q in pairs:
        for step in (p, q):
            if step not in valid:
                raise UsageError(f"$switch={p}:{q}: step {step} is not a checkpoint at or after the anchor",
                                 f"steps: {format_steps(sorted(valid))}", param="switch")
    return pairs


def _gram_pass(plan: _Plan, s: BackboneSettings, ctx: Any, writes_vectors: bool,
               progress: Callable[[float], None] | None, progress_total: Callable[[float], None] | None) -> Any:
    """The GramSet of every group (this rank's share of the tensors, all-reduced under several processes)."""
    from ckptaudit.analyses import distributed

    names = tensor_names_of(plan.groups)
    mine = names
    if ctx is not None:
        with _as_source(plan.anchor) as src:
            sizes = {n: src.nbytes(n) for n in names}
        mine = balanced_shards(names, sizes, ctx.world_size)[ctx.rank]
    if progress_total is not None:
        n_vec = len(tensor_names_of({"v": plan.groups["trunk"]})) if writes_vectors else 0
        progress_total(float((len(mine) + n_vec) * (len(plan.rows) + 1)))
    gs = drift_grams(plan.rows, plan.anchor, plan.groups, device=s.device, chunk_elems=s.chunk_elems,
                     progress=progress, tensor_names=mine)
    if ctx is not None:
        gs = distributed.allreduce_gramset(gs, ctx, tuple(names))
    return gs


def _window(window: int, n_rows: int) -> tuple[int, str | None]:
    """(window used, note): a run with fewer drift rows than the window gets one window over all of its rows
    (stated in the settings) rather than an empty c(w)."""
    used = min(window, n_rows) if n_rows >= 2 else window
    note = (f"the run has {n_rows} drift rows, fewer than the window of {window}: c(w) uses one window of "
            f"{used} rows" if used < window else None)
    return used, note


def _settings_record(s: BackboneSettings, plan: _Plan, used_window: int, window_note: str | None) -> dict[str, Any]:
    """The report's ``settings``: what was asked and what the run made of it."""
    arch = plan.arch
    return {"window": s.window, "window_used": used_window, "window_note": window_note,
            "normalize_rows": s.normalize_rows, "include_bias": s.include_bias,
            "blocks": plan.block_ids, "device": str(s.device), "chunk_elems": int(s.chunk_elems), "metric": s.metric,
            "architecture": arch.name, "architecture_recognised_by": arch.recognised_by,
            "top_k_vectors": s.top_k_vectors, "n_experts": arch.n_experts,
            "missing_trunk": list(arch.missing_trunk),
            "unplaced_block_weights": list(arch.unplaced_block_weights),
            "unused_checkpoints_before_anchor": plan.unused_steps,
            "fit_range": None if s.fit_range is None else [int(s.fit_range[0]), int(s.fit_range[1])],
            "fit_rule": "least squares of log10 |a(t)| and log10 ||r(t)|| on log10 (t - anchor step) over the rows "
                        "with t > anchor step and a non-zero value" + (" inside fit_range" if s.fit_range else "")}


def _vector_count(sigma: np.ndarray, k: int) -> int:
    """How many V_j a vectors pass writes: ``k``, capped by the numerical rank of the drift (at least 1)."""
    rank = int(np.sum(sigma > (sigma[0] * 1e-12 if sigma.size else 0)))
    return max(1, min(int(k), rank))


def save_backbone_vectors(
    sink: str | Path | VectorSink,
    rows: Sequence[CheckpointLike],
    anchor: CheckpointLike,
    pieces: Sequence[Any],
    result: BackboneResult,
    k: int = 6,
    device: str = "cpu",
    progress: Callable[[float], None] | None = None,
    blocks: Mapping[int, BackboneResult] | None = None,
) -> tuple[float, ...]:
    """Stream V_1..V_k (V_j = X^T D u_j / sigma_j, unit vectors over ``pieces``) into ``sink`` (a VectorSink, or
    the path of a safetensors file).

    Layout: one entry per stored tensor holding a selected piece, key = tensor name, float32 of shape
    [k, *tensor_shape]: entry[j] is V_{j+1} on that tensor, zero outside the selected pieces (so it can be dotted
    with a gradient of the same parameter). ``blocks`` (block -> that block's own result): also the block
    backbones v_b^(l) = X_l^T u_1^(l) / sigma_1^(l) (each block's own PC1, signed so that its a(last) > 0) under
    ``block/<tensor name>``, shape tensor_shape, on the pieces of that block. Metadata: steps, anchor_step, sigma,
    k, group, layout. Each checkpoint's tensor is read once (second pass); memory is O(k x largest tensor).
    Returns sigma_1..sigma_k. ``progress`` advances by T + 1 per stored tensor (one unit per checkpoint read,
    anchor included).
    """
    dev = torch.device(device)
    sig = result.sigma
    k = _vector_count(sig, k)
    coef = (result.u[:, :k] * result.row_scale[:, None]) / sig[:k]  # [T, k]; D u_j / sigma_j
    coef_t = torch.as_tensor(coef.T.copy(), dtype=torch.float64, device=dev)  # [k, T]
    by_tensor: dict[str, list] = {}
    for p in pieces:
        by_tensor.setdefault(p.tensor, []).append(p)
    names = tensor_names_of({"v": pieces})
    # Block backbones: per block the coefficients D u_1 / sigma_1 of its own SVD (blocks with a zero drift skipped).
    bcoef = {}
    for b, res in (blocks or {}).items():
        if res.sigma.size and res.sigma[0] > 0:
            bcoef[b] = torch.as_tensor(res.u[:, 0] * res.row_scale / res.sigma[0], dtype=torch.float64, device=dev)
    block_names = [n for n in names if any(p.block in bcoef for p in by_tensor[n])]
    meta = {"steps": json.dumps([int(s) for s in result.steps]), "anchor_step": str(result.anchor_step),
            "sigma": json.dumps([float(s) for s in sig[:k]]), "k": str(k), "group": "trunk",
            "normalize_rows": str(bool(result.normalize_rows)),
            "layout": "key = tensor name; value [k, *tensor_shape]; value[j] = V_{j+1} on this tensor, "
                      "zero outside the trunk pieces; V_j has unit norm over all entries"}
    if block_names:
        meta["block_layout"] = ("key = block/<tensor name>; value tensor_shape; the backbone of the tensor's own block "
                                "(its PC1, unit over that block's trunk pieces, a(last) > 0); zero elsewhere")
        meta["blocks"] = json.dumps(sorted(bcoef))
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for n in names:  # written in this order: each tensor's V stack, then its block backbone
        specs[n] = ((k, *pieces_shape(by_tensor[n])), torch.float32)
        if n in block_names:
            specs[BLOCK_PREFIX + n] = (pieces_shape(by_tensor[n]), torch.float32)
    writer = vector_sink(sink)
    writer.begin(specs, meta)
    try:
        with _as_source(anchor) as asrc:
            srcs = [_as_source(c) for c in rows]
            try:
                for name in names:
                    base = _read(asrc, anchor, name, dev)
                    out = torch.zeros((k, *base.shape), dtype=torch.float64, device=dev)
                    own = torch.zeros(base.shape, dtype=torch.float64, device=dev) if name in block_names else None
                    for i, (c, s) in enumerate(zip(rows, srcs, strict=True)):
                        t = _read(s, c, name, dev)
                        for p in by_tensor[name]:
                            drift = p.take(t).to(torch.float64) - p.take(base).to(torch.float64)
                            for j in range(k):
                                p.take(out[j]).add_(drift, alpha=float(coef_t[j, i]))
                            if own is not None and p.block in bcoef:
                                p.take(own).add_(drift, alpha=float(bcoef[p.block][i]))
                        del t
                    writer.write(name, out.to(torch.float32))
                    if own is not None:
                        writer.write(BLOCK_PREFIX + name, own.to(torch.float32))
                    if progress is not None:
                        progress(float(len(rows) + 1))
            finally:
                for s in srcs:
                    s.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return tuple(float(s) for s in sig[:k])


def pieces_shape(pieces: Sequence[Any]) -> tuple[int, ...]:
    """The stored tensor shape shared by the pieces of one tensor."""
    return tuple(pieces[0].tensor_shape)
