"""Results of the fisher analysis (SPEC §2): one checkpoint (:class:`FisherCheckpoint`) and a run
(:class:`FisherReport`), with their JSON and HDF5 forms. The computation is in :mod:`ckptaudit.analyses.fisher.run`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partialmethod
from typing import Any

import numpy as np

from ckptaudit.analyses.fisher.uncertainty import (
    bootstrap_hdf5,
    bootstrap_json,
    mean_se,
    random_direction_stats,
)
from ckptaudit.report.tree import TreeResult


def _float64(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float64)


def noise_floor(dim: int) -> float:
    """sqrt(2 / (pi D)): E|<x, v>| for x uniform on the unit sphere in dimension D and a fixed unit v (large D)."""
    return math.sqrt(2.0 / (math.pi * dim))


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class FisherCheckpoint(TreeResult):
    """Fisher analysis at one checkpoint.

    q: direction name -> q(v) (gradient units squared), plus "random_mean". q_random: q(w_k), ``[K]``.
    eigenvalues: all M Gram eigenvalues s_j / M, descending (the Fisher's nonzero spectrum). projections:
    ``[M, n_dir]`` <g_i, v> per batch and direction (``direction_names`` order). block_signed_projection: block ->
    b_l. hessian: direction name -> (1/M) sum_i v^T H_i v plus "random_mean" (None without --hessian).
    block_projections / block_grad_norms: ``[M, n_blocks]`` raw <g_{i,l}, v_b^(l)> and ||g_{i,l}|| (blocks in
    ascending order, as ``block_signed_projection``). gram: the M x M Gram G G^T (float64). bootstrap: the seeded
    bootstrap over batches (:func:`ckptaudit.analyses.fisher.uncertainty.batch_bootstrap`) or None.
    """

    step: int
    dim: int
    q: dict[str, float]
    q_random: np.ndarray
    anisotropy: float
    eigenvalues: np.ndarray
    top: int
    top_overlap_backbone: float
    effective_rank: float
    grad_backbone_cos_mean: float
    grad_backbone_cos_std: float
    block_signed_projection: dict[int, float]
    projections: np.ndarray
    direction_names: tuple[str, ...]
    grad_norms: np.ndarray
    losses: np.ndarray
    gradient_storage: str
    hessian: dict[str, float] | None = None
    hessian_random: np.ndarray | None = None
    u1: np.ndarray | None = field(default=None, repr=False)
    seconds: float | None = None
    block_projections: np.ndarray | None = None
    block_grad_norms: np.ndarray | None = None
    gram: np.ndarray | None = field(default=None, repr=False)
    bootstrap: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def trace(self) -> float:
        """tr F = (1/M) sum_i ||g_i||^2 (gradient units squared)."""
        return float(np.mean(np.asarray(self.grad_norms, dtype=np.float64) ** 2))

    @property
    def random_expected(self) -> float:
        """E q(w) over unit w uniform on the sphere orthogonal to v_b: (tr F - q(v_b)) / (D - 1), exact."""
        return (self.trace - self.q["backbone"]) / (self.dim - 1) if self.dim > 1 else float("nan")

    @property
    def anisotropy_exact(self) -> float:
        """q(v_b) / E q(w): the anisotropy without the sampling noise of the K random directions."""
        e = self.random_expected
        return self.q["backbone"] / e if e > 0 else float("nan")

    @property
    def anisotropy_se(self) -> float:
        """Standard error of ``anisotropy`` from the K random quotients (delta method: alpha * se(mean) / mean,
        se(mean) = sample std / sqrt(K)); NaN for K < 2."""
        qr = np.asarray(self.q_random, dtype=np.float64)
        if qr.size < 2 or not qr.mean() > 0:
            return float("nan")
        return float(self.anisotropy) * float(qr.std(ddof=1) / math.sqrt(qr.size)) / float(qr.mean())

    @property
    def trace_se(self) -> float:
        """Standard error of ``trace`` over batches: std(||g_i||^2, ddof 1) / sqrt(M)."""
        return mean_se(np.asarray(self.grad_norms, dtype=np.float64) ** 2)

    def random_stats(self) -> dict[str, float]:
        """q_random_std, q_random_se, q_random_std_exact, q_random_se_exact (see fisher.uncertainty)."""
        return random_direction_stats(self.q_random, self.trace, self.q["backbone"], self.gram,
                                      np.asarray(self.projections)[:, 0], self.dim)

    def q_se(self) -> dict[str, float]:
        """Standard error over batches of q(v) for each named direction: std(<g_i, v>^2, ddof 1) / sqrt(M)."""
        proj = np.asarray(self.projections, dtype=np.float64)
        return {n: mean_se(proj[:, j] ** 2) for j, n in enumerate(self.direction_names) if not n.startswith("random_")}

    def gradient_projection(self) -> dict[str, float]:
        """Signed <g_i, v_b> over batches (gradient units): mean, std (population), standard error; and the signed
        cosine <g_i, v_b> / ||g_i||: mean, std; the standard error of the mean |cos|."""
        p = np.asarray(self.projections, dtype=np.float64)[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = p / np.asarray(self.grad_norms, dtype=np.float64)
        return {"grad_backbone_projection_mean": float(p.mean()), "grad_backbone_projection_std": float(p.std()),
                "grad_backbone_projection_se": mean_se(p), "grad_backbone_cos_signed_mean": float(np.mean(cos)),
                "grad_backbone_cos_signed_std": float(np.std(cos)), "grad_backbone_cos_se": mean_se(np.abs(cos))}

    def block_projection(self) -> dict[str, dict[int, float]]:
        """Per block: mean and std (population) over batches of the raw <g_{i,l}, v_b^(l)> (the paper's code's
        signed projection), and the mean block gradient norm; empty dicts when not recorded."""
        blocks = sorted(self.block_signed_projection)
        if self.block_projections is None:
            return {"block_projection_mean": {}, "block_projection_std": {}, "block_grad_norm_mean": {}}
        bp = np.asarray(self.block_projections, dtype=np.float64)
        bn = np.asarray(self.block_grad_norms, dtype=np.float64)
        return {"block_projection_mean": {b: float(bp[:, j].mean()) for j, b in enumerate(blocks)},
                "block_projection_std": {b: float(bp[:, j].std()) for j, b in enumerate(blocks)},
                "block_grad_norm_mean": {b: float(bn[:, j].mean()) for j, b in enumerate(blocks)}}

    @property
    def noise_floor(self) -> float:
        """sqrt(2 / (pi D))."""
        return noise_floor(self.dim)

    @property
    def top_eigenvalues(self) -> np.ndarray:
        """The ``top`` largest Fisher eigenvalues s_j / M."""
        return self.eigenvalues[: self.top]

    #: in the report only: the per-batch data, the full spectrum, the Gram, the Hessian quotients, timing
    HDF5_ONLY = frozenset({"dim", "q_random", "seconds", "eigenvalues", "blocks", "projections", "direction_names",
                           "grad_norms", "losses", "gradient_storage", "block_projections", "block_grad_norms",
                           "gram", "hessian", "hessian_random"})
    HDF5_SKIP_NONE = frozenset({"block_projections", "block_grad_norms", "gram", "hessian", "hessian_random"})
    #: per-block values: {"<l>": value} in --json, one dataset in block order (``blocks``) in the report
    HDF5_LAYOUT = {"block_signed_projection": "_hdf5_signed", "block_projection_mean": "_hdf5_projection_mean",
                   "block_projection_std": "_hdf5_projection_std", "block_grad_norm_mean": "_hdf5_grad_norm_mean",
                   "bootstrap": "_hdf5_bootstrap"}

    def to_tree(self) -> dict[str, Any]:
        """step, q, anisotropy (+ _se, _exact), random_expected, trace, top_eigenvalues, top_overlap_backbone,
        effective_rank, grad_backbone_cos_mean / _std, noise_floor, block_signed_projection {"<l>": b_l}, q_se,
        trace_se, the random-direction statistics, the signed projections, the per-block projections, the
        bootstrap (without its replicates in --json). The report (/fisher/step_<t>/) adds dim, q_random,
        eigenvalues, projections, direction_names, grad_norms, losses, gradient_storage, seconds, blocks and, when
        computed, block_projections, block_grad_norms, gram, hessian/ and hessian_random; per-block values there are
        datasets in ``blocks`` order and the bootstrap keeps its replicates."""
        blocks = sorted(self.block_signed_projection)
        per_block = {k: {str(b): v for b, v in d.items()} for k, d in self.block_projection().items()}
        tree: dict[str, Any] = {
            "step": int(self.step), "dim": int(self.dim),
            "q": {k: float(v) for k, v in self.q.items()},
            "q_random": np.asarray(self.q_random, dtype=np.float64),
            "anisotropy": float(self.anisotropy),
            "anisotropy_se": self.anisotropy_se,
            "anisotropy_exact": self.anisotropy_exact,
            "random_expected": self.random_expected,
            "trace": self.trace,
            "seconds": self.seconds,
            "eigenvalues": np.asarray(self.eigenvalues, dtype=np.float64),
            "top_eigenvalues": np.asarray(self.top_eigenvalues, dtype=np.float64),
            "top_overlap_backbone": float(self.top_overlap_backbone),
            "effective_rank": float(self.effective_rank),
            "grad_backbone_cos_mean": float(self.grad_backbone_cos_mean),
            "grad_backbone_cos_std": float(self.grad_backbone_cos_std),
            "noise_floor": float(self.noise_floor),
            "blocks": np.asarray(blocks, dtype=np.int64),
            "block_signed_projection": {str(b): float(v) for b, v in self.block_signed_projection.items()},
            "projections": np.asarray(self.projections, dtype=np.float64),
            "direction_names": list(self.direction_names),
            "grad_norms": np.asarray(self.grad_norms, dtype=np.float64),
            "losses": np.asarray(self.losses, dtype=np.float64),
            "gradient_storage": self.gradient_storage.split(":", 1)[0],
            "q_se": self.q_se(), "trace_se": self.trace_se, **self.random_stats(), **self.gradient_projection(),
            **per_block,
            "block_projections": _float64(self.block_projections),
            "block_grad_norms": _float64(self.block_grad_norms) if self.block_projections is not None else None,
            "gram": _float64(self.gram),
            "bootstrap": bootstrap_json(self.bootstrap),
            "hessian": None if self.hessian is None else {k: float(v) for k, v in self.hessian.items()},
            "hessian_random": None if self.hessian is None else _float64(self.hessian_random),
        }
        return tree

    def _per_block(self, key: str, values: dict[str, float]) -> dict[str, Any]:
        """``{key: dataset in blocks order}``; nothing for an empty per-block dict (not recorded)."""
        if not values and key != "block_signed_projection":
            return {}
        return {key: np.asarray([values[str(b)] for b in sorted(self.block_signed_projection)], dtype=np.float64)}

    _hdf5_signed = partialmethod(_per_block, "block_signed_projection")
    _hdf5_projection_mean = partialmethod(_per_block, "block_projection_mean")
    _hdf5_projection_std = partialmethod(_per_block, "block_projection_std")
    _hdf5_grad_norm_mean = partialmethod(_per_block, "block_grad_norm_mean")

    def _hdf5_bootstrap(self, _: Any) -> dict[str, Any]:
        return {} if self.bootstrap is None else {"bootstrap": bootstrap_hdf5(self.bootstrap)}


@dataclass(frozen=True, eq=False)
class FisherReport(TreeResult):
    """Fisher analysis over checkpoints (ascending step) with the backbone stiffening curve and running sums.

    block_running_sum: block -> B_l(t) = sum of b_l over the checkpoints up to t (one value per checkpoint).
    direction_cosines: direction name -> <v_b, v> (signed; the probe directions against the backbone, e.g. the
    paper's |<v_b, v_sw>|).
    """

    checkpoints: tuple[FisherCheckpoint, ...]
    dim: int
    settings: dict[str, Any]
    block_running_sum: dict[int, np.ndarray]
    direction_cosines: dict[str, float] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def block_projection_running_sum(self) -> dict[int, np.ndarray]:
        """block -> running sum over checkpoints of the mean raw <g_{i,l}, v_b^(l)> (the paper's code's cumulative
        signed bias; B_l of the normalised b_l is ``block_running_sum``)."""
        per = [c.block_projection()["block_projection_mean"] for c in self.checkpoints]
        if not per or not per[0]:
            return {}
        return {b: np.cumsum([d[b] for d in per]) for b in sorted(per[0])}

    def stiffening(self) -> dict[str, list]:
        """{"steps", "q_backbone", "anisotropy", ...} over the checkpoints, with the standard errors and, when the
        bootstrap ran, its intervals (NaN where absent)."""
        cks = self.checkpoints

        def boot(c: FisherCheckpoint, part: str, key: str) -> float:
            return float("nan") if c.bootstrap is None else c.bootstrap[part].get(key, float("nan"))

        out: dict[str, list] = {
            "steps": self.steps, "q_backbone": [c.q["backbone"] for c in cks],
            "anisotropy": [c.anisotropy for c in cks], "anisotropy_se": [c.anisotropy_se for c in cks],
            "anisotropy_exact": [c.anisotropy_exact for c in cks],
            "q_backbone_se": [c.q_se()["backbone"] for c in cks],
            "lambda_1": [float(c.eigenvalues[0]) if len(c.eigenvalues) else float("nan") for c in cks],
            "trace": [c.trace for c in cks],
        }
        for key, name in (("q_backbone", "q_backbone"), ("anisotropy", "anisotropy"),
                          ("anisotropy_exact", "anisotropy_exact"), ("lambda_1", "lambda_1")):
            out[f"{key}_ci_low"] = [boot(c, "ci_low", name) for c in cks]
            out[f"{key}_ci_high"] = [boot(c, "ci_high", name) for c in cks]
        return out

    def switch_pair(self) -> dict[str, Any] | None:
        """With ``--switch PEAK:TROUGH`` and both steps analysed: lambda_1, tr F and q(v_b) at the peak and the
        trough and their peak / trough ratios (what the paper's code compares), else None."""
        pair = self.settings.get("switch")
        at = {c.step: c for c in self.checkpoints}
        if not pair or int(pair[0]) not in at or int(pair[1]) not in at:
            return None
        peak, trough = at[int(pair[0])], at[int(pair[1])]
        out: dict[str, Any] = {"peak": peak.step, "trough": trough.step}
        for name, get in (("lambda_1", lambda c: float(c.eigenvalues[0])), ("trace", lambda c: c.trace),
                          ("q_backbone", lambda c: c.q["backbone"])):
            a, b = get(peak), get(trough)
            out[name] = {"peak": a, "trough": b, "ratio": a / b if b > 0 else float("nan")}
        return out

    JSON_ONLY = frozenset({"hessian"})
    HDF5_SKIP_NONE = frozenset({"switch_pair"})
    HDF5_AS_TEXT = {"settings": "settings_json"}
    HDF5_LAYOUT = {"checkpoints": "_hdf5_checkpoints"}

    def to_tree(self) -> dict[str, Any]:
        """checkpoints (FisherCheckpoint trees; the report: one group step_<t>/ each), stiffening (steps,
        q_backbone, anisotropy, their errors and intervals), block_running_sum {"<l>": [B_l(t)]},
        block_projection_running_sum, direction_cosines, switch_pair (or None; the report only when analysed),
        hessian (--json only: list of {step, <direction>: v^T H v, random_mean} or None), dim, settings (the
        report: settings_json)."""
        hess = None
        if any(c.hessian is not None for c in self.checkpoints):
            hess = [{"step": c.step, **(c.hessian or {})} for c in self.checkpoints]
        return {
            "checkpoints": list(self.checkpoints),
            "stiffening": {k: np.asarray(v, dtype=np.float64 if k != "steps" else np.int64)
                           for k, v in self.stiffening().items()},
            "block_running_sum": {str(b): np.asarray(v, dtype=np.float64) for b, v in self.block_running_sum.items()},
            "block_projection_running_sum": {str(b): np.asarray(v, dtype=np.float64)
                                             for b, v in self.block_projection_running_sum().items()},
            "direction_cosines": {k: float(v) for k, v in self.direction_cosines.items()},
            "switch_pair": self.switch_pair(),
            "hessian": hess,
            "dim": int(self.dim),
            "settings": dict(self.settings),
        }

    def _hdf5_checkpoints(self, checkpoints: list[FisherCheckpoint]) -> dict[str, Any]:
        return {f"step_{c.step}": c.to_hdf5_tree() for c in checkpoints}
